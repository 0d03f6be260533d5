"""Slurm: the gateway runs on the login node beside the hub, as root, and submits each scheduler and worker as a
Slurm job of the requesting user (through `sudo -u <user> dask-gateway-jobqueue-launcher`). The environment in
ctx.bin must sit on a file system the compute nodes share. Only names here: nothing of Slurm is needed to load
this file."""

import socket

from dask_gateway_server.options import Bool, Integer, Options

GPU_SETUP = "#SBATCH --gres=gpu:1"  # right after the job script's #!/bin/sh line: one GPU per worker job
GiB = 2**30


def options_handler(options) -> dict:
    "Cluster options a user may pick: threads per worker, and a GPU per worker."
    out = {"worker_threads": options.worker_threads, "worker_cores": options.worker_threads}
    if options.gpu: out["worker_setup"] = GPU_SETUP
    return out


def configure(c, ctx):
    port = ctx.settings.gateway.port
    c.DaskGateway.backend_class = "dask_gateway_server.backends.jobqueue.slurm.SlurmBackend"
    c.SlurmBackend.dask_gateway_jobqueue_launcher = str(ctx.bin / "dask-gateway-jobqueue-launcher")
    # schedulers on compute nodes call the gateway back and clients reach them through its proxy: listen on the
    # login node's interfaces, not only on loopback
    c.Proxy.address = f":{port}"
    c.DBBackendBase.api_url = f"http://{socket.getfqdn()}:{port}{c.Proxy.prefix}/api"
    c.SlurmClusterConfig.staging_directory = "{home}/.dask-gateway/"
    c.SlurmClusterConfig.scheduler_cores, c.SlurmClusterConfig.scheduler_memory = 1, 2 * GiB
    c.SlurmClusterConfig.worker_cores, c.SlurmClusterConfig.worker_memory = 1, 4 * GiB
    # limits per cluster; the partition's and the account's limits bound all users together
    c.SlurmClusterConfig.cluster_max_cores = 65.0
    c.SlurmClusterConfig.cluster_max_memory = 2 * GiB + 64 * 4 * GiB
    c.SlurmClusterConfig.cluster_max_workers = 64
    c.Backend.cluster_options = Options(
        Integer("worker_threads", default=ctx.settings.dask.threads_per_worker, min=1, max=16,
                label="Threads (cores) per worker"),
        Bool("gpu", default=False, label="One GPU per worker"),
        handler=options_handler)
