"""The registry's boundary: workspaces record runs, models and evaluations through the hedgerl service, never by
opening the registry's database, which only the service reaches (hedgerl.remote; the service's own [registry] url is
the database). A workspace gets the service's address as its [registry] url (HEDGERL_REGISTRY_URL: hedgerl's
`open_registry` makes it a RemoteRegistry), and its own hub token (JUPYTERHUB_API_TOKEN) may call the service: the
token carries `access:services!service=hedgerl`, which JupyterHub grants only to users who hold it (the group of
approved users, through the role of 30-service.py). The service then runs every registry call as the token's user.

Where a workspace reaches the service: on one machine, straight on loopback at [service] host:port (the service
serves under its full prefix, so no proxy hop is needed, and no dependence on the public [hub] host); on Kubernetes,
the hub pod's service `hub` (the service runs in that pod); under Slurm the workspace runs on another node, so it
goes through the proxy's public address."""
import socket

SERVICE = "hedgerl"
# What a workspace's own token needs for the service, on top of JupyterHub's default `server` role (which is used only
# when nothing is asked for, so it is repeated here).
SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server", f"access:services!service={SERVICE}"]


def reachable(host: str) -> str:
    "An address to connect to for a bind address: a wildcard means this machine (loopback)."
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "*") else host


def registry_service_url(ctx) -> str:
    "The hedgerl service's URL as a workspace reaches it (the registry API lives under it, at api/v1/registry)."
    s, h = ctx.settings.service, ctx.settings.hub
    if ctx.deployment == "kubernetes": base = f"http://hub:{s.port}"
    elif ctx.deployment == "slurm":
        host = h.host if h.host not in ("", "0.0.0.0", "::", "*", "127.0.0.1", "localhost", "::1") else socket.getfqdn()
        base = f"http://{host}:{h.port}"
    else: base = f"http://{reachable(s.host)}:{s.port}"
    return f"{base}/services/{SERVICE}/"


def configure(c, ctx):
    c.Spawner.environment.update({"HEDGERL_REGISTRY_URL": registry_service_url(ctx)})
    # Merged with what other files ask for (a list set earlier, or a lazy extend): never a plain assignment.
    scopes = c.Spawner.server_token_scopes
    if callable(scopes):
        raise ValueError("Spawner.server_token_scopes is a callable: add the hedgerl service's scopes to it: "
                         + ", ".join(SERVER_TOKEN_SCOPES))
    scopes.extend([s for s in SERVER_TOKEN_SCOPES if not isinstance(scopes, list) or s not in scopes])
