"""The dask-gateway as a hub-managed service at /services/dask-gateway/ (dask/gateway_config.py), a role that lets
the group `researchers` (approved users) use it, and what a workspace's Dask client needs to find it."""

import base64
import os
import socket

SERVICE = "dask-gateway"
USERS_GROUP = "researchers"  # approved users (hub/jupyterhub_config.d/10-auth.py)
ENCRYPT_KEY_SECRET = "dask_gateway_encrypt_key"  # the same secret as dask/gateway_config.d/00-base.py
# the server role's scopes (JupyterHub's default for a workspace's token) and the gateway's
SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server", f"access:services!service={SERVICE}"]
WILDCARD = ("", "0.0.0.0", "::", "*")


def reachable(ctx, host: str) -> str:
    "The address a workspace reaches `host` (the hub's or the gateway's listening address) at."
    if ctx.deployment == "slurm" and host in WILDCARD + ("127.0.0.1", "localhost", "::1"):
        return socket.getfqdn()  # workspaces run on compute nodes: the login node's name
    return "127.0.0.1" if host in WILDCARD else host


def gateway_environment(ctx) -> dict:
    "What the gateway process needs: the settings the hub runs with, and the key of its database."
    s = ctx.settings
    # the hub's own setting overrides, but not its database's URL (maybe with a password): none of the gateway's
    # business
    env = {k: v for k, v in os.environ.items() if k.startswith("HEDGERL_") and k != "HEDGERL_HUB_DB_URL"}
    # `$$`: a literal $ in settings
    env.update({"HEDGERL_HUB_STATE": str(ctx.state).replace("$", "$$"), "HEDGERL_HUB_DEPLOYMENT": ctx.deployment,
                "HEDGERL_GATEWAY_PORT": str(s.gateway.port),
                "HEDGERL_GATEWAY_IDLE_TIMEOUT": str(s.gateway.idle_timeout),
                "HEDGERL_DASK_THREADS_PER_WORKER": str(s.dask.threads_per_worker)})
    if s.source is not None: env["HEDGERL_SETTINGS"] = str(s.source)  # a path, not a setting: no interpolation
    env["DASK_GATEWAY_ENCRYPT_KEYS"] = base64.b64encode(bytes.fromhex(ctx.secret(ENCRYPT_KEY_SECRET))).decode()
    return env


def workspace_environment(ctx) -> dict:
    "What a workspace's `dask_gateway` client and `hedgerl.backtest.dask_client` read."
    s = ctx.settings
    path = f"/services/{SERVICE}"
    hub = f"http://{reachable(ctx, s.hub.host)}:{s.hub.port}"
    return {
        "DASK_GATEWAY__ADDRESS": hub + path,  # the gateway's API through the hub's proxy
        # dashboard links as a browser opens them: the hub's address, or relative to the page when it listens everywhere
        "DASK_GATEWAY__PUBLIC_ADDRESS": path if s.hub.host in WILDCARD else hub + path,
        # schedulers (TLS) through the gateway's own proxy on [gateway] port: loopback on one machine, the login node's
        # name on Slurm (dask/gateway_config.d/20-backend.slurm.py listens on every interface there)
        "DASK_GATEWAY__PROXY_ADDRESS": f"gateway://{reachable(ctx, '127.0.0.1')}:{s.gateway.port}",
        "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",  # the workspace's JUPYTERHUB_API_TOKEN
        "HEDGERL_DASK_CLUSTER": "gateway",  # hedgerl.backtest.dask_client goes through the gateway
    }


def configure(c, ctx):
    port = ctx.settings.gateway.port
    # In Kubernetes the dask-gateway chart runs the gateway and hub/kubernetes/values.yaml registers the service and
    # the workspaces' variables; here the hub starts it (one machine, or the Slurm login node).
    if ctx.deployment != "kubernetes":
        c.JupyterHub.services.append({
            "name": SERVICE,
            "url": f"http://127.0.0.1:{port}",
            "command": [str(ctx.bin / "dask-gateway-server"), "-f", str(ctx.root / "dask" / "gateway_config.py")],
            "environment": gateway_environment(ctx),  # the hub adds JUPYTERHUB_API_TOKEN, _API_URL and _SERVICE_NAME
            "display": False,
        })
        c.Spawner.environment.update(workspace_environment(ctx))
    # The gateway needs no scope of its own: it asks the hub who a user is with that user's token (GET /hub/api/user)
    # and checks the token's scopes. Users need access to the service: the group of approved users gets it (JupyterHub
    # creates a group a role names; no load_groups here: it conflicts with an authenticator that manages groups).
    c.JupyterHub.load_roles.append({
        "name": "dask-gateway-users",
        "description": "Start, list and reach one's own Dask clusters through the dask-gateway service",
        "scopes": [f"access:services!service={SERVICE}"],
        "groups": [USERS_GROUP],
    })
    # A workspace's own token (JUPYTERHUB_API_TOKEN) may reach the gateway: JupyterHub grants a server token only
    # the scopes its user holds. Merged with what other files ask for (a list set earlier, or a lazy extend).
    scopes = c.Spawner.server_token_scopes
    if callable(scopes): raise ValueError("Spawner.server_token_scopes is a callable: add the dask-gateway scopes to "
                                          "it: " + ", ".join(SERVER_TOKEN_SCOPES))
    scopes.extend([s for s in SERVER_TOKEN_SCOPES if not isinstance(scopes, list) or s not in scopes])
