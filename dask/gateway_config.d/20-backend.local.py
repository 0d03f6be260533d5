"""One machine: clusters are local processes. As root each cluster runs as its user's own system account (the one
the hub's spawner made, a member of the system group `hedgerl`); not as root, every cluster runs as the gateway's
own account and users are NOT isolated from each other (said at start and on every cluster start)."""

import grp
import logging
import os
import pwd
import tempfile
from pathlib import Path

from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.backends.local import LocalBackend, UnsafeLocalBackend
from dask_gateway_server.options import Integer, Options

PLATFORM_GROUP = "hedgerl"  # the system group of the accounts the hub's spawner creates
GiB = 2**30
NOT_ISOLATED = ("dask-gateway is not running as root: every user's Dask cluster runs as this one account ({}), "
                "so users are NOT isolated from each other (one machine, development only)")


def account_problem(name: str) -> str | None:
    "Why clusters of hub user `name` cannot run as a system account of that name, or None when they can."
    try: pw = pwd.getpwnam(name)
    except KeyError:
        return (f"user {name!r} has no system account on this machine, so no Dask cluster can run as them: "
                f"start your workspace from the hub once (it creates the account), or ask the administrator")
    if pw.pw_uid == 0: return f"user {name!r} is the superuser: Dask clusters never run as root"
    try: group = grp.getgrnam(PLATFORM_GROUP)
    except KeyError: return (f"the system group {PLATFORM_GROUP!r} of the platform's accounts does not exist: start a "
                             f"workspace from the hub first")
    if pw.pw_gid != group.gr_gid and name not in group.gr_mem:
        return (f"the system account {name!r} is not a platform account (not in group {PLATFORM_GROUP!r}): "
                f"Dask clusters run only as accounts the hub created")
    return None


class UserAccountBackend(LocalBackend):
    "Local processes under the requesting user's own system account (the gateway runs as root)."
    async def start_cluster(self, user, cluster_options):
        problem = account_problem(user.name)
        if problem:
            self.log.warning("Refused a cluster for %s: %s", user.name, problem)
            raise PublicException(problem)  # the client gets it as the reason of a 422
        return await super().start_cluster(user, cluster_options)

    def setup_working_directory(self, cluster):
        # dask-gateway-server 2026.3's version adds the TLS files' paths to the list it chowns one character at a
        # time (`paths.extend(path)`): as root it gives "/" to the user, then fails. This one chowns the five paths.
        workdir = (os.path.join(self.clusters_directory, cluster.name) if self.clusters_directory
                   else tempfile.mkdtemp(prefix="dask", suffix=cluster.name))
        paths = [workdir, self.get_certs_directory(workdir), self.get_logs_directory(workdir)]
        for path in paths: os.makedirs(path, 0o700, exist_ok=True)
        for path, data in zip(self._get_tls_paths(workdir), (cluster.tls_cert, cluster.tls_key)):
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f: f.write(data)
            paths.append(path)
        self.set_file_permissions(paths, cluster.username)
        return workdir

    def set_file_permissions(self, paths, username):
        for p in paths:  # never a relative name, "/" or a top-level folder: working directories lie deeper
            if not os.path.isabs(p) or len(Path(p).parts) < 3:
                raise RuntimeError(f"refusing to give {p!r} to {username}: not in a cluster's working directory")
        super().set_file_permissions(paths, username)


class SharedAccountBackend(UnsafeLocalBackend):
    "Local processes under the gateway's own account: no isolation between users (not root: development only)."
    async def do_setup(self):
        self.log.warning(NOT_ISOLATED.format(pwd.getpwuid(os.getuid()).pw_name))
        await super().do_setup()

    async def start_cluster(self, user, cluster_options):
        self.log.warning("Cluster for %s runs as %s, not isolated from other users' clusters", user.name,
                         pwd.getpwuid(os.getuid()).pw_name)
        return await super().start_cluster(user, cluster_options)


def machine() -> tuple[int, int]:
    "This machine's cores and memory in bytes."
    return os.cpu_count() or 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def configure(c, ctx):
    cores, memory = machine()
    if ctx.as_root:
        c.DaskGateway.backend_class = UserAccountBackend
    else:
        logging.getLogger("DaskGateway").warning(NOT_ISOLATED.format(pwd.getpwuid(os.getuid()).pw_name))
        c.DaskGateway.backend_class = SharedAccountBackend
    # Limits per cluster: at most one single-core worker per core of the machine (more only oversubscribes it),
    # three quarters of its memory in all; the scheduler counts against both.
    budget = int(0.75 * memory)
    c.LocalClusterConfig.scheduler_cores = 1
    c.LocalClusterConfig.scheduler_memory = GiB
    c.LocalClusterConfig.worker_cores = 1
    c.LocalClusterConfig.worker_memory = max(GiB, min(4 * GiB, (budget - GiB) // cores))
    c.LocalClusterConfig.cluster_max_cores = float(cores + 1)
    c.LocalClusterConfig.cluster_max_memory = budget
    c.LocalClusterConfig.cluster_max_workers = cores
    # workers' scratch space in the cluster's working directory (their cwd), removed with the cluster, not in a
    # /tmp/dask-scratch-space-<uid> left behind
    c.LocalClusterConfig.environment.update({"DASK_TEMPORARY_DIRECTORY": "."})
    # a client may ask for threads per worker (hedgerl's `dask_client(threads_per_worker=...)`), up to the cores
    c.Backend.cluster_options = Options(
        Integer("worker_threads", default=min(ctx.settings.dask.threads_per_worker, cores), min=1, max=cores,
                label="Threads per worker"),
        handler=lambda options: {"worker_threads": options.worker_threads})
