"""dask/gateway_config.d (each deployment's backend file) and hub/jupyterhub_config.d/40-gateway.py applied to a bare
traitlets `Config`, as the gateway and the hub load them: the resolved commands, timeouts, authentication, limits and
cluster options, the workspace's variables, the service's role and token scopes. No process is started here
(tests/test_gateway.py starts real ones)."""
import base64
import grp
import importlib.util
import logging
import os
import pwd
import socket
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from traitlets.config import Config

from hedgerl.core import load_settings
from hedgerl.platform import PlatformContext, load_config_dir

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "dask" / "gateway_config.d"
HUB = ROOT / "hub" / "jupyterhub_config.d"
BIN = Path(sys.executable).parent
SCOPE = "access:services!service=dask-gateway"


def context(tmp_path, deployment="local", as_root=True, **env) -> PlatformContext:
    environ = {"HEDGERL_HUB_STATE": str(tmp_path / "state"), "HEDGERL_DATA_FOLDER": str(tmp_path / "data"),
               "HEDGERL_HUB_DEPLOYMENT": deployment, "HEDGERL_HUB_PORT": "18150", "HEDGERL_GATEWAY_PORT": "18159",
               **{f"HEDGERL_{k.upper()}": str(v) for k, v in env.items()}}
    return PlatformContext(settings=load_settings(environ=environ), as_root=as_root, bin=BIN)


def gateway(tmp_path, deployment="local", as_root=True, **env):
    "dask/gateway_config.d applied to a bare Config: (config, context, files applied)."
    ctx = context(tmp_path, deployment, as_root, **env)
    c = Config()
    return c, ctx, load_config_dir(c, GATEWAY, ctx)


def module(folder: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"test_gateway_config_{name.replace('-', '_').replace('.', '_')}",
                                                  folder / name)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    return mod


def merged(value, initial=()):
    """A list (or, with `initial={}`, dict) trait's configured value, whether assigned or merged by several files (a
    LazyConfigValue)."""
    return value.get_value(list(initial) if isinstance(initial, tuple) else initial) if hasattr(value,
            "get_value") else value


def test_common_settings(tmp_path):
    """Every deployment: hub authentication with the service's scope enforced, the proxy under the hub's prefix,
    lifetimes."""
    c, ctx, names = gateway(tmp_path, gateway_idle_timeout=321, dask_threads_per_worker=1)
    assert names == ["00-base.py", "20-backend.local.py"]
    assert c.DaskGateway.authenticator_class == "dask_gateway_server.auth.JupyterHubAuthenticator"
    assert c.JupyterHubAuthenticator.jupyterhub_service_name == "dask-gateway"
    assert c.JupyterHubAuthenticator.use_service_access_scopes is True
    assert c.Proxy.address == "127.0.0.1:18159" and c.Proxy.prefix == "/services/dask-gateway"
    assert c.DaskGateway.address == "127.0.0.1:0"  # the private API: loopback, reached through the proxy
    assert c.DBBackendBase.db_url == f"sqlite:///{tmp_path / 'state' / 'dask-gateway.sqlite'}"
    assert c.DBBackendBase.stop_clusters_on_shutdown is True
    assert c.ClusterConfig.idle_timeout == 321.0
    assert c.ClusterConfig.scheduler_cmd == [str(BIN / "dask"), "scheduler"]
    assert c.ClusterConfig.worker_cmd == [str(BIN / "dask"), "worker"]
    assert os.access(BIN / "dask", os.X_OK)  # distributed's one CLI: no dask-scheduler / dask-worker scripts
    env = merged(c.ClusterConfig.environment, {})
    assert env == {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": "{'MALLOC_TRIM_THRESHOLD_': None}"}


def test_nanny_environ_unsets_malloc_trim(tmp_path, monkeypatch):
    "The workers' dask-config override drops MALLOC_TRIM_THRESHOLD_ and keeps the nanny's one-BLAS-thread variables."
    import dask
    from distributed.nanny import _get_env_variables
    c, _, _ = gateway(tmp_path)
    (k, v), = merged(c.ClusterConfig.environment, {}).items()
    monkeypatch.setenv(k, v)
    dask.config.refresh()
    try:
        env = _get_env_variables("distributed.nanny.pre-spawn-environ")
        assert "MALLOC_TRIM_THRESHOLD_" not in env and env["OMP_NUM_THREADS"] == "1"
    finally:
        monkeypatch.delenv(k); dask.config.refresh()


def test_database_key(tmp_path, monkeypatch):
    "Started by hand (no DASK_GATEWAY_ENCRYPT_KEYS), the gateway reads its database key from the state's 0600 secret."
    monkeypatch.delenv("DASK_GATEWAY_ENCRYPT_KEYS", raising=False)
    c, ctx, _ = gateway(tmp_path)
    key, = c.DBBackendBase.db_encrypt_keys
    assert len(base64.b64decode(key)) == 32
    f = tmp_path / "state" / "secrets" / "dask_gateway_encrypt_key"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and base64.b64decode(key) == bytes.fromhex(f.read_text())
    monkeypatch.setenv("DASK_GATEWAY_ENCRYPT_KEYS", key)  # as the hub starts it: the variable, nothing in the config
    c2, _, _ = gateway(tmp_path)
    assert "db_encrypt_keys" not in c2.DBBackendBase


def test_local_as_root(tmp_path):
    "As root: clusters as the user's own account; limits of one single-core worker per core, 3/4 of the memory."
    from dask_gateway_server.backends.local import LocalBackend, LocalClusterConfig
    c, ctx, _ = gateway(tmp_path, as_root=True)
    backend = c.DaskGateway.backend_class
    assert issubclass(backend, LocalBackend) and backend.__name__ == "UserAccountBackend"
    cores, memory = os.cpu_count(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cc = LocalClusterConfig(config=c)
    assert (cc.worker_cores, cc.scheduler_cores, cc.scheduler_memory) == (1, 1, 2**30)
    assert cc.cluster_max_workers == cores and cc.cluster_max_cores == cores + 1
    assert cc.cluster_max_memory == int(0.75 * memory)
    assert (2**30 <= cc.worker_memory <= 4 * 2**30
            and cc.scheduler_memory + cores * cc.worker_memory <= cc.cluster_max_memory)
    assert cc.idle_timeout == 1800.0  # [gateway] idle_timeout's default
    assert cc.environment == {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": "{'MALLOC_TRIM_THRESHOLD_': None}",
                              "DASK_TEMPORARY_DIRECTORY": "."}
    b = backend(config=c)
    assert b.db_url.startswith("sqlite:///") and len(b.db_encrypt_keys) == 1 and b.stop_clusters_on_shutdown
    spec, = b.cluster_options.get_specification()
    assert spec == {"field": "worker_threads", "label": "Threads per worker", "default": 1, "spec": {"type": "int",
            "min": 1, "max": cores}}
    o = b.cluster_options
    assert o.get_configuration(o.parse_options({"worker_threads": cores}), None) == {"worker_threads": cores}
    with pytest.raises(ValueError): o.parse_options({"worker_threads": cores + 1})
    with pytest.raises(ValueError, match="Unknown fields"): o.parse_options({"worker_memory": 1})


def test_local_not_root(tmp_path, caplog):
    "Not root: the shared-account backend, with a warning that users are not isolated."
    from dask_gateway_server.backends.local import UnsafeLocalBackend
    with caplog.at_level(logging.WARNING, logger="DaskGateway"):
        c, _, _ = gateway(tmp_path, as_root=False)
    assert issubclass(
            c.DaskGateway.backend_class,
            UnsafeLocalBackend) and c.DaskGateway.backend_class.__name__ == "SharedAccountBackend"
    assert "NOT isolated" in caplog.text and pwd.getpwuid(os.getuid()).pw_name in caplog.text


def test_accounts(monkeypatch):
    """Clusters run only as platform accounts (group `hedgerl`), never root; a user without an account gets a clear
    reason."""
    mod = module(GATEWAY, "20-backend.local.py")
    assert ("has no system account" in mod.account_problem("hb-no-such-user-x")
            and "start your workspace" in mod.account_problem("hb-no-such-user-x"))
    assert "superuser" in mod.account_problem("root")
    other = pwd.getpwnam("nobody")
    monkeypatch.setattr(grp, "getgrnam", lambda name: SimpleNamespace(gr_name=name, gr_gid=987654,
                                                                      gr_mem=["hbsomeone"]))
    assert "not a platform account" in mod.account_problem(other.pw_name)
    monkeypatch.setattr(grp, "getgrnam", lambda name: SimpleNamespace(gr_name=name, gr_gid=987654,
                                                                      gr_mem=[other.pw_name]))
    assert mod.account_problem(other.pw_name) is None
    def missing(name): raise KeyError(name)
    monkeypatch.setattr(grp, "getgrnam", missing)
    assert "group 'hedgerl'" in mod.account_problem(other.pw_name)


def test_working_directory_chowns_only_its_files(tmp_path, monkeypatch):
    ("dask-gateway-server 2026.3 chowns the TLS paths one character at a time (\"/\" first): ours chowns exactly its "
     "five paths.")
    mod = module(GATEWAY, "20-backend.local.py")
    c, _, _ = gateway(tmp_path)
    b = mod.UserAccountBackend(config=c, clusters_directory=str(tmp_path / "clusters"))
    owned = []
    monkeypatch.setattr(os, "chown", lambda p, uid, gid: owned.append(p))
    me = pwd.getpwuid(os.getuid()).pw_name
    workdir = b.setup_working_directory(SimpleNamespace(name="c1", username=me, tls_cert=b"cert", tls_key=b"key"))
    assert workdir == str(tmp_path / "clusters" / "c1")
    assert owned == [workdir, f"{workdir}/.certs", f"{workdir}/logs", f"{workdir}/.certs/dask.crt",
                     f"{workdir}/.certs/dask.pem"]
    assert Path(workdir, ".certs", "dask.pem").read_bytes() == b"key" and stat.S_IMODE(Path(workdir, ".certs",
            "dask.pem").stat().st_mode) == 0o600
    for bad in (["/"], ["t"], ["/tmp"]):
        with pytest.raises(RuntimeError, match="refusing"): b.set_file_permissions(bad, me)
    assert len(owned) == 5


def test_kubernetes(tmp_path):
    """Kubernetes: the KubeBackend by name (kubernetes_asyncio not needed to load), the hedgerl image, a GPU option,
    limits."""
    before = set(sys.modules)
    c, ctx, names = gateway(tmp_path, deployment="kubernetes")
    assert names == ["00-base.py", "20-backend.kubernetes.py"]
    assert c.DaskGateway.backend_class == "dask_gateway_server.backends.kubernetes.KubeBackend"
    assert not any(m.startswith(("kubernetes", "dask_gateway_server.backends.kubernetes")) for m in set(sys.modules)
                   - before)
    k = c.KubeClusterConfig
    profiles = (ROOT / "hub" / "profiles.yaml").read_text()
    assert k.image == "ghcr.io/hedgerl/workspace:latest" and f"image: {k.image}" in profiles and k.scheduler_cmd == [
            "dask", "scheduler"] and k.worker_cmd == ["dask", "worker"]
    assert (k.worker_cores, k.worker_memory, k.cluster_max_workers) == (1, 4 * 2**30, 32)
    assert (k.cluster_max_cores - k.scheduler_cores) // k.worker_cores == 32
    # no file state: the chart's CRDs hold it
    assert "db_url" not in c.DBBackendBase and not (tmp_path / "state").exists()
    o = c.Backend.cluster_options
    assert o.get_configuration(o.parse_options({"gpu": True, "worker_threads": 2}), None) == {
        "worker_threads": 2, "worker_extra_container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
    assert o.get_configuration(o.parse_options({}), None) == {"worker_threads": 1}


def test_slurm(tmp_path):
    """Slurm: the JobQueue SlurmBackend by name, the environment's launcher, every interface, a GPU option
    (--gres=gpu:1)."""
    from dask_gateway_server.backends.jobqueue.slurm import SlurmBackend, SlurmClusterConfig
    c, ctx, names = gateway(tmp_path, deployment="slurm")
    assert names == ["00-base.py", "20-backend.slurm.py"]
    assert c.DaskGateway.backend_class == "dask_gateway_server.backends.jobqueue.slurm.SlurmBackend"
    assert c.SlurmBackend.dask_gateway_jobqueue_launcher == str(BIN / "dask-gateway-jobqueue-launcher")
    assert os.access(c.SlurmBackend.dask_gateway_jobqueue_launcher, os.X_OK)
    assert c.Proxy.address == ":18159"
    assert c.DBBackendBase.api_url == f"http://{socket.getfqdn()}:18159/services/dask-gateway/api"
    sc = SlurmClusterConfig(config=c)
    assert (sc.scheduler_cmd == [str(BIN / "dask"), "scheduler"] and sc.cluster_max_workers == 64
            and sc.idle_timeout == 1800.0)
    b = SlurmBackend(config=c)
    cmd, env, script = b.get_submit_cmd_env_stdin(SimpleNamespace(config=SlurmClusterConfig(config=c,
            worker_setup=c.Backend.cluster_options.get_configuration(
        {"gpu": True, "worker_threads": 2}, None)["worker_setup"]), name="c1", token="t",
        username=pwd.getpwuid(os.getuid()).pw_name,
        scheduler_address="tls://n1:1", state={}), worker=SimpleNamespace(name="w1"))
    # sbatch reads directives before the first command
    assert script.splitlines()[:2] == ["#!/bin/sh", "#SBATCH --gres=gpu:1"]
    assert script.splitlines()[2].startswith(f"{BIN / 'dask'} worker tls://n1:1")


def hub_gateway(tmp_path, deployment="local", c=None, **env):
    ctx = context(tmp_path, deployment, **env)
    c = c or Config()
    module(HUB, "40-gateway.py").configure(c, ctx)
    return c, ctx


def test_hub_service(tmp_path, monkeypatch):
    "The hub starts the gateway as its service, gives it the settings and the database key, and no scope of its own."
    monkeypatch.setenv("HEDGERL_HUB_DB_URL", "postgresql+psycopg://hub:secret@db/hub")
    monkeypatch.setenv("HEDGERL_DASK_N_WORKERS", "3")
    c, ctx = hub_gateway(tmp_path)
    svc, = merged(c.JupyterHub.services)
    assert svc["name"] == "dask-gateway" and svc["url"] == "http://127.0.0.1:18159"
    assert svc["command"] == [str(BIN / "dask-gateway-server"), "-f", str(ROOT / "dask" / "gateway_config.py")]
    assert Path(svc["command"][0]).exists() and Path(svc["command"][2]).is_file()
    env = svc["environment"]
    assert env["HEDGERL_HUB_STATE"] == str(tmp_path / "state") and env["HEDGERL_GATEWAY_PORT"] == "18159" and env[
            "HEDGERL_HUB_DEPLOYMENT"] == "local"
    # the hub's overrides, but not its database
    assert env["HEDGERL_DASK_N_WORKERS"] == "3" and "HEDGERL_HUB_DB_URL" not in env
    key = base64.b64decode(env["DASK_GATEWAY_ENCRYPT_KEYS"])
    assert key == bytes.fromhex((tmp_path / "state" / "secrets" / "dask_gateway_encrypt_key").read_text())
    assert "api_token" not in svc  # the hub makes the service's token and hands it over as JUPYTERHUB_API_TOKEN
    role, = merged(c.JupyterHub.load_roles)
    assert role["scopes"] == [SCOPE] and role["groups"] == ["researchers"] and not role.get("users") and not role.get(
            "services")
    assert "load_groups" not in c.JupyterHub  # it would clash with an authenticator that manages groups


def test_hub_workspace_environment(tmp_path):
    "Workspaces find the gateway through the hub's proxy, the schedulers through the gateway's, as their own hub user."
    from jupyterhub.spawner import LocalProcessSpawner
    c, ctx = hub_gateway(tmp_path)
    sp = LocalProcessSpawner(config=c)
    assert sp.environment == {"DASK_GATEWAY__ADDRESS": "http://127.0.0.1:18150/services/dask-gateway",
                              "DASK_GATEWAY__PUBLIC_ADDRESS": "http://127.0.0.1:18150/services/dask-gateway",
                              "DASK_GATEWAY__PROXY_ADDRESS": "gateway://127.0.0.1:18159",
                              "DASK_GATEWAY__AUTH__TYPE": "jupyterhub", "HEDGERL_DASK_CLUSTER": "gateway"}
    assert sp.server_token_scopes == ["users:activity!user", "access:servers!server", SCOPE]
    # the settings a workspace reads with them
    s = load_settings(environ={k: v for k, v in sp.environment.items() if k.startswith("HEDGERL_")})
    assert s.dask.cluster == "gateway"
    # a hub listening everywhere: workspaces use loopback, dashboard links are relative to the page
    c, _ = hub_gateway(tmp_path / "all", hub_host="0.0.0.0")
    env = LocalProcessSpawner(config=c).environment
    assert env["DASK_GATEWAY__ADDRESS"] == "http://127.0.0.1:18150/services/dask-gateway" and env[
            "DASK_GATEWAY__PUBLIC_ADDRESS"] == "/services/dask-gateway"


def test_hub_token_scopes_merge(tmp_path):
    "Scopes other files ask for stay: a list assigned before, or lazy extends from several files."
    from jupyterhub.spawner import LocalProcessSpawner
    c = Config(); c.Spawner.server_token_scopes = ["access:services!service=hedgerl", "users:activity!user"]
    c, _ = hub_gateway(tmp_path, c=c)
    assert c.Spawner.server_token_scopes == ["access:services!service=hedgerl", "users:activity!user",
                                             "access:servers!server", SCOPE]
    c = Config(); c.Spawner.server_token_scopes.extend(["access:services!service=hedgerl"])
    c, _ = hub_gateway(tmp_path / "2", c=c)
    assert set(LocalProcessSpawner(config=c).server_token_scopes) == {"access:services!service=hedgerl",
                                                                      "users:activity!user", "access:servers!server",
                                                                      SCOPE}
    c = Config(); c.Spawner.server_token_scopes = lambda spawner: []
    with pytest.raises(ValueError, match="callable"): hub_gateway(tmp_path / "3", c=c)


def test_hub_slurm_and_kubernetes(tmp_path):
    """Slurm: workspaces on compute nodes reach the login node by name. Kubernetes: the chart runs and registers the
    gateway."""
    from jupyterhub.spawner import LocalProcessSpawner
    c, _ = hub_gateway(tmp_path, deployment="slurm")
    env = LocalProcessSpawner(config=c).environment
    fqdn = socket.getfqdn()
    assert env["DASK_GATEWAY__ADDRESS"] == f"http://{fqdn}:18150/services/dask-gateway" and env[
            "DASK_GATEWAY__PROXY_ADDRESS"] == f"gateway://{fqdn}:18159"
    assert merged(c.JupyterHub.services)[0]["environment"]["HEDGERL_HUB_DEPLOYMENT"] == "slurm"
    c, _ = hub_gateway(tmp_path / "k", deployment="kubernetes")
    assert "services" not in c.JupyterHub and "environment" not in c.Spawner  # hub/kubernetes/values.yaml has them
    assert merged(c.JupyterHub.load_roles)[0]["scopes"] == [SCOPE] and SCOPE in merged(c.Spawner.server_token_scopes)


def test_whole_hub_folder_has_one_gateway(tmp_path):
    """Loaded with every other file of hub/jupyterhub_config.d, as the hub does: one dask-gateway service, its scope on
    workspace tokens."""
    from jupyterhub.spawner import LocalProcessSpawner
    ctx = context(tmp_path)
    c = Config()
    names = load_config_dir(c, HUB, ctx)
    assert "40-gateway.py" in names
    services = [s for s in merged(c.JupyterHub.services) if s["name"] == "dask-gateway"]
    assert len(services) == 1
    sp = LocalProcessSpawner(config=c)
    assert SCOPE in sp.server_token_scopes and "users:activity!user" in sp.server_token_scopes
    assert sp.environment["HEDGERL_DASK_CLUSTER"] == "gateway"
