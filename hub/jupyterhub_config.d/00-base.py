"""Base: the public address ([hub] host:port, served by configurable-http-proxy), the proxy's API on 127.0.0.1:port+1,
the hub's API on 127.0.0.1:port+2, the generated secrets, and the state folder ([hub] state, 0700) that keeps the pid
files, the log and (by default) the database. On Kubernetes the Zero to JupyterHub chart runs the proxy, keeps these
secrets and binds the hub itself (hub/kubernetes/values.yaml), so only the state folder is set here."""
from pathlib import Path


def proxy_command(ctx) -> Path:
    "configurable-http-proxy as installed by the set-up (npm, beside the environment); a clear error when missing."
    chp = ctx.bin.parent / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
    if not chp.exists():
        raise FileNotFoundError(f"{chp}: configurable-http-proxy is not installed (run make install)")
    return chp


def configure(c, ctx):
    state = Path(ctx.state)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)  # secrets, the hub database and the admin's credentials live here
    c.JupyterHub.pid_file = str(state / "jupyterhub.pid")
    c.JupyterHub.logging_config = {
        "handlers": {"file": {"class": "logging.FileHandler", "formatter": "console",
                              "filename": str(state / "jupyterhub.log")}},
        "loggers": {"JupyterHub": {"handlers": ["console", "file"]}}}
    if ctx.deployment == "kubernetes": return
    h = ctx.settings.hub
    c.JupyterHub.bind_url = f"http://{h.host}:{h.port}"
    c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{h.port + 2}"
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{h.port + 1}"
    c.ConfigurableHTTPProxy.command = [str(proxy_command(ctx))]
    c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")
    c.ConfigurableHTTPProxy.auth_token = ctx.secret("proxy_token")
    c.JupyterHub.cookie_secret = bytes.fromhex(ctx.secret("cookie_secret"))
    c.JupyterHub.cleanup_servers = True  # stopping the hub stops every workspace: `make down` leaves no process behind
    c.JupyterHub.cleanup_proxy = True
