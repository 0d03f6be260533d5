"""The idle culler (jupyterhub-idle-culler) as a hub-managed service: it stops a workspace idle for [hub] idle_timeout
seconds. Its role holds only the scopes its README lists for culling servers (not users): list:users,
read:users:activity, read:servers, delete:servers."""
NAME = "idle-culler"
SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]


def configure(c, ctx):
    timeout = int(ctx.settings.hub.idle_timeout)
    every = max(10, min(300, timeout // 4))  # check a few times per timeout, at most every 5 minutes
    c.JupyterHub.services.append({"name": NAME, "display": False,
                                  "command": [str(ctx.bin / "python"), "-m", "jupyterhub_idle_culler",
                                              f"--timeout={timeout}", f"--cull-every={every}"]})
    c.JupyterHub.load_roles.append({"name": NAME, "description": "stop idle workspaces", "scopes": SCOPES,
                                    "services": [NAME]})
