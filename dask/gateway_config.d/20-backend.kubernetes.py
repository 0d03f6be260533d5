"""Kubernetes (the daskhub pattern: the dask-gateway chart beside Zero to JupyterHub, see hub/kubernetes/): the
gateway's KubeBackend starts each cluster as pods in the gateway's namespace, from an image with hedgerl installed.
Only names here: the backend's packages (kubernetes_asyncio) are needed where the gateway runs, not to load this
file. The chart's own values (image, namespace, API token, traefik proxy) take precedence over these defaults."""

from dask_gateway_server.options import Bool, Integer, Options

# the workspace image of the hub's Kubernetes profiles (hub/profiles.yaml, hub/kubernetes/Dockerfile.workspace):
# hedgerl and its Dask stack installed, `dask` on PATH; schedulers and workers run hedgerl's code
IMAGE = "ghcr.io/hedgerl/workspace:latest"
GPU = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}  # one GPU per worker pod (the NVIDIA device plugin's resource)
GiB = 2**30


def options_handler(options) -> dict:
    "Cluster options a user may pick: threads per worker, and a GPU per worker."
    out = {"worker_threads": options.worker_threads}
    if options.gpu: out["worker_extra_container_config"] = GPU
    return out


def configure(c, ctx):
    c.DaskGateway.backend_class = "dask_gateway_server.backends.kubernetes.KubeBackend"
    c.DaskGateway.address = ":8000"  # the API inside the gateway's pod; the chart's traefik routes to it
    c.KubeClusterConfig.image = IMAGE
    c.KubeClusterConfig.image_pull_policy = "IfNotPresent"
    # the image's environment is on PATH (distributed has no dask-scheduler / dask-worker scripts any more)
    c.KubeClusterConfig.scheduler_cmd = ["dask", "scheduler"]
    c.KubeClusterConfig.worker_cmd = ["dask", "worker"]
    c.KubeClusterConfig.scheduler_cores, c.KubeClusterConfig.scheduler_memory = 1, 2 * GiB
    c.KubeClusterConfig.worker_cores, c.KubeClusterConfig.worker_memory = 1, 4 * GiB
    # limits per cluster; the namespace's ResourceQuota bounds all users together
    c.KubeClusterConfig.cluster_max_cores = 33.0
    c.KubeClusterConfig.cluster_max_memory = 2 * GiB + 32 * 4 * GiB
    c.KubeClusterConfig.cluster_max_workers = 32
    c.Backend.cluster_options = Options(
        Integer("worker_threads", default=ctx.settings.dask.threads_per_worker, min=1, max=8,
                label="Threads per worker"),
        Bool("gpu", default=False, label="One GPU per worker"),
        handler=options_handler)
