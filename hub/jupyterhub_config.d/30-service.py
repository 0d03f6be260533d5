"""The hedgerl service (hedgerl.service: FastAPI under uvicorn) as a hub-managed service at /services/hedgerl/, and
the role that lets the group `researchers` (approved users) use it.

The service needs no scope of its own: it asks the hub who owns a caller's token with that token
(GET /hub/api/user, which any token may call about itself) and trades browser login codes for tokens with its
OAuth client secret (its API token). So it gets no role: a role with no scopes only makes the hub warn at every
start, and any scope would be more than it uses (tests/test_service.py checks what its token holds)."""

SERVICE = "hedgerl"
USERS_GROUP = "researchers"  # approved users (hub/jupyterhub_config.d/10-auth.py)
ACCESS = f"access:services!service={SERVICE}"


def loopback(host: str) -> str:
    "An address this machine's processes reach `host` by: a wildcard bind means loopback."
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "*") else host


def service_url(ctx) -> str:
    """Where the proxy reaches the service: [service] host:port; on Kubernetes the hub pod's service name (the service
    runs in it)."""
    s = ctx.settings.service
    host = "hub" if ctx.deployment == "kubernetes" else loopback(s.host)
    return f"http://{host}:{s.port}"


def service_environment(ctx) -> dict:
    """The service's settings are the hub's: each key as its HEDGERL_<SECTION>_<KEY> variable (the hub passes on none
    of its own)."""
    env = {f"HEDGERL_{section}_{key}".upper(): str(value).replace("$", "$$")  # `$` is interpolation syntax in settings
           for section, keys in ctx.settings.as_dict().items() for key, value in keys.items()
           if (section, key) != ("hub", "db_url")}  # the hub's database (maybe with a password) is none of its business
    env["HEDGERL_HUB_STATE"] = str(ctx.state).replace("$", "$$")  # the login cookie's secret lives there
    if ctx.deployment == "kubernetes": env["HEDGERL_SERVICE_HOST"] = "0.0.0.0"  # reached from the proxy's pod
    if ctx.settings.source is not None: env["HEDGERL_SETTINGS"] = str(ctx.settings.source)
    return env


def configure(c, ctx):
    c.JupyterHub.services.append({
        "name": SERVICE,
        "url": service_url(ctx),
        "command": [str(ctx.bin / "python"), "-m", "hedgerl.service"],
        # the hub adds JUPYTERHUB_API_TOKEN, _CLIENT_ID, _SERVICE_URL, _SERVICE_PREFIX, ...
        "environment": service_environment(ctx),
        "oauth_no_confirm": True,  # part of the platform: a browser's login goes straight through, no consent page
        "display": True,  # listed in the hub's Services menu
    })
    # Users have no access to a service by default: the group of approved users gets it (JupyterHub 6 creates a group
    # that a role names; no load_groups here, which conflicts with an authenticator that manages groups).
    c.JupyterHub.load_roles.append({
        "name": "hedgerl-service-users",
        "description": "Use the hedgerl service (its API and dashboards) at /services/hedgerl/",
        "scopes": [ACCESS],
        "groups": [USERS_GROUP],
    })
