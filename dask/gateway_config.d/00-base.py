"""Every deployment: users authenticated by JupyterHub (a token needs `access:services!service=dask-gateway`),
the gateway behind the hub's proxy at /services/dask-gateway, its database in the hub's state folder, idle clusters
shut down after `[gateway] idle_timeout`, every cluster stopped when the gateway stops."""

import base64
import os

SERVICE = "dask-gateway"  # the hub service's name: its URL prefix and the scope users need
PREFIX = f"/services/{SERVICE}"
# in [hub] state/secrets, shared with hub/jupyterhub_config.d/40-gateway.py
ENCRYPT_KEY_SECRET = "dask_gateway_encrypt_key"
# Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which makes every large numpy temporary a fresh
# page-faulting mapping (3-4 times slower chunks, see `local_cluster` in nbs/07_backtest.ipynb). A None in this
# dask-config override unsets it and keeps the nanny's other variables (one BLAS thread).
NANNY_ENVIRON = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": "{'MALLOC_TRIM_THRESHOLD_': None}"}


def encrypt_key(ctx) -> str:
    "The key that encrypts the clusters' TLS credentials in the gateway's database: base64 of the secret's 32 bytes."
    return base64.b64encode(bytes.fromhex(ctx.secret(ENCRYPT_KEY_SECRET))).decode()


def configure(c, ctx):
    s = ctx.settings
    c.DaskGateway.authenticator_class = "dask_gateway_server.auth.JupyterHubAuthenticator"
    # the hub sets JUPYTERHUB_SERVICE_NAME for its managed services; naming it here keeps the scope check on when
    # the gateway is started by hand or by a chart
    c.JupyterHubAuthenticator.jupyterhub_service_name = SERVICE
    c.JupyterHubAuthenticator.use_service_access_scopes = True
    # the gateway's own proxy: HTTP API and dashboards under the hub's service prefix, and the schedulers' TLS
    # connections, on one port ([gateway] port); the hub's proxy forwards /services/dask-gateway/ to it
    c.Proxy.address = f"127.0.0.1:{s.gateway.port}"
    c.Proxy.prefix = PREFIX
    c.DaskGateway.address = "127.0.0.1:0"  # the private API, reached through the proxy only
    if ctx.deployment != "kubernetes":  # the Kubernetes backend keeps its state in the cluster's resources
        c.DBBackendBase.db_url = f"sqlite:///{ctx.state / 'dask-gateway.sqlite'}"
        if not os.environ.get("DASK_GATEWAY_ENCRYPT_KEYS"):  # the hub sets it; started by hand, read the same secret
            c.DBBackendBase.db_encrypt_keys = [encrypt_key(ctx)]
        c.DBBackendBase.stop_clusters_on_shutdown = True
    c.ClusterConfig.idle_timeout = float(s.gateway.idle_timeout)
    # distributed has no dask-scheduler / dask-worker scripts any more
    c.ClusterConfig.scheduler_cmd = [str(ctx.bin / "dask"), "scheduler"]
    c.ClusterConfig.worker_cmd = [str(ctx.bin / "dask"), "worker"]
    c.ClusterConfig.environment.update(NANNY_ENVIRON)
    c.ClusterConfig.worker_threads = s.dask.threads_per_worker
