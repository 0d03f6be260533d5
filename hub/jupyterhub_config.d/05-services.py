"""A managed service that cannot start (the dask-gateway on a broken database, the hedgerl service on a bad setting)
must not take the hub down with it: JupyterHub 6 exits when one does not come up at start. Here the hub logs it and
goes on serving everyone else; JupyterHub's own watch restarts a managed service that exits (every 30 s), and
`hedgerl hub up` names any service that does not answer."""


def keep_serving(JupyterHub) -> None:
    "Make `JupyterHub.start_service` report a managed service that failed to start, and carry on (once per class)."
    if getattr(JupyterHub.start_service, "hedgerl_keeps_serving", False): return
    start_service = JupyterHub.start_service

    async def start_or_log(self, service_name, service, ssl_context=None):
        if await start_service(self, service_name, service, ssl_context): return True
        if not service.managed: return False
        self.log.error("Service %s did not start: the hub serves without it (JupyterHub restarts it if its process "
                       "exits)", service_name)
        return True

    start_or_log.hedgerl_keeps_serving = True
    JupyterHub.start_service = start_or_log


def configure(c, ctx):
    from jupyterhub.app import JupyterHub
    keep_serving(JupyterHub)
