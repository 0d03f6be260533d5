"""hub/jupyterhub_config.d loaded onto a bare traitlets `Config` for each deployment (local as root, local not root,
Kubernetes, Slurm), as the hub loads it: the resolved values (ports, proxy, secrets, allow rules, spawner, profiles'
CPU/GPU requests, culler scopes, metrics role, database), and malformed profile files named by their field."""
import importlib.util
import os
import stat
import sys
from pathlib import Path

import jinja2
import pytest
import yaml
from traitlets.config import Config

from hedgerl.core import load_settings
from hedgerl.platform import PlatformContext, load_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "hub" / "jupyterhub_config.d"
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a2b6f3c-0d1e-4c8a-9b7e-2f4d6a8c0e13)"


def load(tmp_path, deployment="local", as_root=True, bin_=None, **env):
    "The whole folder applied to a bare Config, for `deployment`; (config, context, names of the files applied)."
    environ = {"HEDGERL_HUB_STATE": str(tmp_path / "state"), "HEDGERL_DATA_FOLDER": str(tmp_path / "data"),
               "HEDGERL_HUB_DEPLOYMENT": deployment, "HEDGERL_HUB_PORT": "18050",
               **{f"HEDGERL_{k.upper()}": str(v) for k, v in env.items()}}
    ctx = PlatformContext(settings=load_settings(environ=environ), as_root=as_root, **({"bin": bin_} if bin_ else {}))
    c = Config()
    return c, ctx, load_config_dir(c, CONF, ctx)


def module(name):
    "A config file of the folder as a module (its classes and helpers)."
    spec = importlib.util.spec_from_file_location(f"test_hub_config_{name.replace('-', '_').replace('.', '_')}",
                                                  CONF / name)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    return mod


def merged(lazy):
    "A list trait's value, whether set (a list) or merged by several files (a LazyConfigValue)."
    return lazy.get_value([]) if hasattr(lazy, "get_value") else lazy


@pytest.fixture
def gpu_path(tmp_path, monkeypatch):
    "A PATH whose `nvidia-smi -L` lists one H100, as on a GPU machine."
    d = tmp_path / "gpubin"; d.mkdir()
    smi = d / "nvidia-smi"; smi.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && echo '{H100}'\n"); smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def no_gpu_path(tmp_path, monkeypatch):
    "A PATH whose `nvidia-smi` finds no GPU, as on a machine with the driver and no device (this one may have a GPU)."
    d = tmp_path / "nogpubin"; d.mkdir()
    smi = d / "nvidia-smi"; smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n"); smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")


def test_local_as_root(tmp_path, no_gpu_path):
    c, ctx, names = load(tmp_path)
    assert names[:4] == ["00-base.py", "05-services.py", "10-auth.py",
                         "20-spawner.local.py"] and "20-spawner.kubernetes.py" not in names
    assert {"50-database.py", "60-culler.py", "70-metrics.py"} <= set(names)
    jh = c.JupyterHub
    # addresses: public proxy, its API on port + 1, the hub's API on port + 2
    assert jh.bind_url == "http://127.0.0.1:18050" and jh.hub_bind_url == "http://127.0.0.1:18052"
    assert c.ConfigurableHTTPProxy.api_url == "http://127.0.0.1:18051"
    chp = ctx.bin.parent / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
    assert c.ConfigurableHTTPProxy.command == [str(chp)] and chp.exists()
    # secrets: generated into the state folder (0600 in a 0700 folder), used as they are
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("proxy_token", "cookie_secret", "prometheus_token"):
        assert stat.S_IMODE((state / "secrets" / name).stat().st_mode) == 0o600
    assert c.ConfigurableHTTPProxy.auth_token == (state / "secrets" / "proxy_token").read_text()
    assert (jh.cookie_secret == bytes.fromhex((state / "secrets" / "cookie_secret").read_text())
            and len(jh.cookie_secret) == 32)
    assert jh.pid_file == str(state / "jupyterhub.pid") and c.ConfigurableHTTPProxy.pid_file == str(
            state / "jupyterhub-proxy.pid")
    assert jh.logging_config["handlers"]["file"]["filename"] == str(state / "jupyterhub.log")
    assert jh.db_url == f"sqlite:///{state}/jupyterhub.sqlite"
    # authentication: approval is the allow rule, never allow_all
    assert jh.authenticator_class.__name__ == "HedgerlAuthenticator"
    assert c.Authenticator.allow_all is False and c.Authenticator.admin_users == {"admin"}
    assert c.NativeAuthenticator.open_signup is False and c.NativeAuthenticator.minimum_password_length >= 8
    assert c.NativeAuthenticator.check_common_password is True and c.NativeAuthenticator.allowed_failed_logins > 0
    assert c.HedgerlAuthenticator.system_accounts == "platform"
    # workspaces: the user's own account, this environment's singleuser server, JupyterLab, the CPU profile only
    assert jh.spawner_class.__name__ == "WorkspaceSpawner" and c.WorkspaceSpawner.isolate is True
    assert c.Spawner.cmd == [str(ctx.bin / "jupyterhub-singleuser")] and c.Spawner.default_url == "/lab"
    assert [p["slug"] for p in c.WorkspaceSpawner.profiles] == ["cpu"] and c.WorkspaceSpawner.profiles[0]["default"]
    assert [Path(f).name for f in c.WorkspaceSpawner.seed_files] == ["01_first_hedge.ipynb",
                                                                     "02_baselines_and_backtests.ipynb", "train.ipynb",
                                                                     "evaluation.ipynb", "player.ipynb"]
    env = c.Spawner.environment.get_value({})
    assert env["HEDGERL_SETTINGS"] == str(ROOT / "settings.ini") and env["JUPYTER_CONFIG_PATH"] == str(
            ROOT / "hub" / "workspace")
    # Voila's offline template
    assert (Path(env["JUPYTER_PATH"]) / "voila" / "templates" / "hedgerl" / "index.html.j2").is_file()
    assert "announcement" not in c.JupyterHub.template_vars.get_value({})


def test_services_and_roles(tmp_path, no_gpu_path):
    c, ctx, _ = load(tmp_path, hub_idle_timeout=1200)
    services = {s["name"]: s for s in merged(c.JupyterHub.services)}
    roles = {r["name"]: r for r in merged(c.JupyterHub.load_roles)}
    culler = services["idle-culler"]
    assert culler["command"][:3] == [str(ctx.bin / "python"), "-m", "jupyterhub_idle_culler"]
    assert "--timeout=1200" in culler["command"] and "--cull-every=300" in culler["command"]
    # only what the culler's README lists for culling servers: no admin:users, no access to servers
    assert sorted(roles["idle-culler"]["scopes"]) == sorted(["list:users", "read:users:activity", "read:servers",
                                                             "delete:servers"])
    assert roles["idle-culler"]["services"] == ["idle-culler"]
    assert c.JupyterHub.authenticate_prometheus is True
    assert services["prometheus"]["api_token"] == ctx.secret("prometheus_token") and "command" not in services[
            "prometheus"]
    assert roles["metrics-reader"] == {"name": "metrics-reader", "description": "read /hub/metrics",
                                       "scopes": ["read:metrics"],
                                       "services": ["prometheus"]}
    assert len(roles) == len(merged(c.JupyterHub.load_roles)), "two roles share a name"


def test_local_with_a_gpu(tmp_path, gpu_path):
    c, _, _ = load(tmp_path)
    cpu, gpu = c.WorkspaceSpawner.profiles
    assert (cpu["slug"], cpu["gpu"], cpu["cpu"], cpu["memory"], cpu["default"]) == ("cpu", 0, 2, "4G", True)
    assert (gpu["slug"], gpu["gpu"], gpu["cpu"], gpu["memory"], gpu["default"]) == ("gpu", 1, 8, "32G", False)
    sp = c.JupyterHub.spawner_class(config=c)
    assert ('value="cpu" checked' in sp.options_form and 'value="gpu"' in sp.options_form
            and "GPU workspace" in sp.options_form)
    assert sp.options_from_form({"profile": ["gpu"]}) == {"profile": "gpu"}
    assert sp.profile["slug"] == "cpu"
    sp.user_options = {"profile": "gpu"}; assert sp.profile["gpu"] == 1
    sp.user_options = {"profile": "tpu"}
    with pytest.raises(ValueError, match="profile 'tpu' is not offered here; offered: cpu, gpu"): sp.profile


def test_local_without_a_gpu_offers_no_form(tmp_path, no_gpu_path):
    c, _, _ = load(tmp_path)
    assert c.JupyterHub.spawner_class(config=c).options_form == ""


def test_local_not_root(tmp_path, no_gpu_path, caplog):
    with caplog.at_level("WARNING", logger="JupyterHub"): c, _, _ = load(tmp_path, as_root=False)
    assert c.WorkspaceSpawner.isolate is False
    assert c.WorkspaceSpawner.workspaces == str(tmp_path / "data" / "workspaces")
    banner = c.JupyterHub.template_vars.get_value({})["announcement"]
    assert "NOT isolated" in banner and any("NOT isolated" in r.getMessage() for r in caplog.records)


def test_kubernetes(tmp_path):
    c, _, names = load(tmp_path, deployment="kubernetes")
    assert "20-spawner.kubernetes.py" in names and "20-spawner.local.py" not in names
    assert c.JupyterHub.spawner_class == "kubespawner.KubeSpawner"  # by name: kubespawner is not installed here
    with pytest.raises(ImportError): __import__("kubespawner")
    cpu, gpu = c.KubeSpawner.profile_list
    assert cpu["slug"] == "cpu" and cpu["default"] is True and gpu["slug"] == "gpu" and gpu["default"] is False
    o = cpu["kubespawner_override"]
    assert (o["cpu_guarantee"], o["cpu_limit"], o["mem_guarantee"], o["mem_limit"]) == (2.0, 2.0, "4G", "4G")
    assert o["image"] == "ghcr.io/hedgerl/workspace:latest" and "extra_resource_limits" not in o
    g = gpu["kubespawner_override"]
    assert g["extra_resource_limits"] == {"nvidia.com/gpu": "1"} and (g["cpu_limit"], g["mem_limit"]) == (8.0, "32G")
    assert g["node_selector"] == {"nvidia.com/gpu.present": "true"} and g["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert c.KubeSpawner.cmd == ["jupyterhub-singleuser"] and c.KubeSpawner.default_url == "/lab"
    # the chart runs the proxy and keeps its secrets: no local proxy, ports or cookie secret here
    assert "ConfigurableHTTPProxy" not in c and "bind_url" not in c.JupyterHub and "cookie_secret" not in c.JupyterHub
    assert c.HedgerlAuthenticator.system_accounts == "none" and c.Authenticator.allow_all is False


def test_slurm(tmp_path):
    c, _, names = load(tmp_path, deployment="slurm")
    assert "20-spawner.slurm.py" in names and "20-spawner.local.py" not in names
    assert c.JupyterHub.spawner_class == "wrapspawner.ProfilesSpawner"
    (cpu_name, cpu_key, cpu_cls, cpu), (gpu_name, gpu_key, gpu_cls, gpu) = c.ProfilesSpawner.profiles
    assert (cpu_key, gpu_key) == ("cpu", "gpu") and cpu_cls == gpu_cls == "batchspawner.SlurmSpawner"
    assert cpu["cmd"] == ["/opt/hedgerl/.venv/bin/jupyterhub-singleuser"] and cpu["req_gres"] == ""
    assert (gpu["req_gres"], gpu["req_nprocs"], gpu["req_memory"], gpu["req_partition"]) == ("gpu:1", "8", "32G", "gpu")

    def script(conf):  # as batchspawner renders it (jinja2, the req_* traits without their prefix)
        subvars = {k[4:]: v for k, v in conf.items() if k.startswith("req_")}
        return jinja2.Template(conf["batch_script"]).render(homedir="/home/u", keepvars="PATH", prologue="",
                                                            epilogue="",
                                                            cmd=" ".join(conf["cmd"]), **subvars)
    g, p = script(gpu), script(cpu)
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --partition=gpu",
                 "#SBATCH --time=08:00:00", "srun /opt/hedgerl/.venv/bin/jupyterhub-singleuser"):
        assert line in g.splitlines(), line
    assert "--gres" not in p and "#SBATCH --partition=cpu" in p and "#SBATCH --cpus-per-task=2" in p
    assert c.JupyterHub.hub_bind_url == "http://0.0.0.0:18052" and c.JupyterHub.hub_connect_url.endswith(":18052")
    assert c.HedgerlAuthenticator.system_accounts == "site"


def test_database_url(tmp_path, no_gpu_path):
    url = "postgresql+psycopg://hub@db.example:5432/jupyterhub"
    c, _, _ = load(tmp_path, hub_db_url=url)
    assert c.JupyterHub.db_url == url


def test_proxy_missing(tmp_path, no_gpu_path):
    with pytest.raises(FileNotFoundError, match=r"configurable-http-proxy is not installed \(run make install\)"):
        load(tmp_path, bin_=tmp_path / "env" / "bin")


BAD_PROFILES = [
    ("profiles: [{slug: cpu, display_name: C, memory: 4G}]", r"profiles\[0\]\.cpu: missing"),
    ("profiles: [{slug: cpu, display_name: C, cpu: 2, memory: 4G}, {slug: gpu, display_name: G, cpu: 8, memory: 32G, "
     "gpu: one}]",
     r"profiles\[1\]\.gpu: expected an integer >= 0, got 'one'"),
    ("profiles: [{slug: cpu, display_name: C, cpu: 2, memory: 4 GB}]", r"profiles\[0\]\.memory: expected a size"),
    ("profiles: [{slug: cpu, display_name: C, cpu: -1, memory: 4G}]",
     r"profiles\[0\]\.cpu: expected a number of cores > 0"),
    ("profiles: [{slug: CPU!, display_name: C, cpu: 1, memory: 4G}]", r"profiles\[0\]\.slug"),
    ("profiles: [{slug: a, display_name: A, cpu: 1, memory: 1G}, {slug: a, display_name: B, cpu: 1, memory: 1G}]",
     r"profiles: duplicate slug\(s\) a"),
    ("profiles: [{slug: a, display_name: A, cpu: 1, memory: 1G, gpus: 1}]", r"profiles\[0\]: unknown key\(s\) gpus"),
    ("profiles: [{slug: a, display_name: A, cpu: 1, memory: 1G, default: true}, {slug: b, display_name: B, cpu: 1, "
     "memory: 1G, default: true}]",
     r"more than one profile has default: true"),
    ("profiles: [{slug: a, display_name: A, cpu: 1, memory: 1G, kubernetes: {image: 3}}]",
     r"profiles\[0\]\.kubernetes\.image"),
    ("profiles: []", r"profiles: expected a non-empty list"),
    ("profile: []", r"top level: unknown key\(s\) profile"),
    ("profiles: [a: b", r"not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD_PROFILES)
def test_malformed_profiles(tmp_path, no_gpu_path, text, message):
    bad = tmp_path / "profiles.yaml"; bad.write_text(text)
    with pytest.raises(ValueError, match=f"{bad}: .*{message}"): load(tmp_path, hub_profiles=bad)


def test_missing_profiles_file(tmp_path, no_gpu_path):
    with pytest.raises(ValueError, match="no such profiles file"): load(tmp_path, hub_profiles=tmp_path / "nope.yaml")


def test_only_gpu_profiles_without_a_gpu(tmp_path, no_gpu_path):
    f = tmp_path / "profiles.yaml"; f.write_text(
            "profiles: [{slug: gpu, display_name: G, cpu: 8, memory: 32G, gpu: 1}]")
    with pytest.raises(ValueError, match="every profile asks for a GPU and `nvidia-smi -L` lists 0 here"): load(
            tmp_path, hub_profiles=f)


def test_sign_up_rules(tmp_path):
    auth = module("10-auth.py")
    a = auth.HedgerlAuthenticator(add_new_table=False, admin_users={"admin"}, minimum_password_length=8,
                                   check_common_password=True)
    ok = "a-long-passphrase-7"
    assert a.signup_problem("hanew", ok) is None
    assert "system account" in a.signup_problem("root", ok) and "system account" in a.signup_problem("postgres", ok)
    assert "system group" in a.signup_problem("sudo", ok)  # a group of that name: useradd --user-group would fail
    assert "administrator" in a.signup_problem("admin", ok)  # never claimable by signing up first
    for bad in ("Bad Name", "1abc", "a/b", "x" * 32, "ha.dot"):
        assert "lowercase letter" in a.signup_problem(bad, ok), bad
    assert "too short" in a.signup_problem("hanew", "short7")
    assert "too common" in a.signup_problem("hanew", "password123")
    assert "user name" in a.signup_problem("hanew", "hanew-password")
    assert a.create_user("root", ok) is None
    site = auth.HedgerlAuthenticator(add_new_table=False, system_accounts="site")
    assert "no account" in site.signup_problem("ha-nobody-here",
                                               ok) and "system account" in site.signup_problem("daemon", ok)
    assert auth.HedgerlAuthenticator(add_new_table=False, system_accounts="none").signup_problem("postgres", ok) is None


def test_values_yaml():
    v = yaml.safe_load((ROOT / "hub" / "kubernetes" / "values.yaml").read_text())
    jh, gw = v["jupyterhub"], v["dask-gateway"]
    # the hub loads this repository's folder (mounted from a ConfigMap) with the kubernetes deployment
    assert "load_config_dir" in jh["hub"]["extraConfig"]["hedgerl"]
    env = jh["hub"]["extraEnv"]
    assert env["HEDGERL_HUB_DEPLOYMENT"] == "kubernetes"
    # no secret in the file: they come from a Kubernetes Secret
    assert env["HEDGERL_HUB_DB_URL"]["valueFrom"]["secretKeyRef"]["name"]
    text = (ROOT / "hub" / "kubernetes" / "values.yaml").read_text()
    for key in ("secretToken", "cookieSecret", "apiToken", "password"):
        for line in text.splitlines():
            if line.strip().startswith(f"{key}:"): assert line.split(":", 1)[1].strip() in ("", '""', "null"), line
    # dask-gateway beside the hub, authenticating through it (the daskhub pattern)
    assert gw["gateway"]["auth"]["type"] == "jupyterhub"
    assert gw["gateway"]["auth"]["jupyterhub"]["apiTokenFromSecretKey"] == "hub.services.dask-gateway.apiToken"
    assert gw["gateway"]["prefix"] == "/services/dask-gateway" and "dask-gateway" in jh["hub"]["services"]
    assert jh["cull"]["enabled"] is False  # the hub's own idle-culler service (60-culler.py) culls


def test_local_gpus(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("test_hub_profiles", ROOT / "hub" / "profiles.py")
    profiles = importlib.util.module_from_spec(spec); sys.modules[spec.name] = profiles; spec.loader.exec_module(
            profiles)
    d = tmp_path / "bin"; d.mkdir(); smi = d / "nvidia-smi"; monkeypatch.setenv("PATH", str(d))
    assert profiles.local_gpus() == []  # no nvidia-smi at all
    smi.write_text(f"#!/bin/sh\necho '{H100}'\necho '{H100.replace('GPU 0', 'GPU 1')}'\n"); smi.chmod(0o755)
    assert profiles.local_gpus() == [H100, H100.replace("GPU 0", "GPU 1")]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA "
                   "driver.'\nexit 9\n")
    assert profiles.local_gpus() == []


def test_a_managed_service_that_fails_to_start_is_logged_not_fatal():
    """05-services.py: JupyterHub.start_service reports a managed service that did not start and lets the hub go on
    (once, however often loaded)."""
    import asyncio, importlib.util, logging
    spec = importlib.util.spec_from_file_location("services05", CONF / "05-services.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    class FakeHub:
        log = logging.getLogger("fake-hub")
        async def start_service(self, name, service, ssl_context=None): return service.ok
    mod.keep_serving(FakeHub); patched = FakeHub.start_service
    mod.keep_serving(FakeHub); assert FakeHub.start_service is patched  # not wrapped twice
    svc = lambda ok, managed: type("S", (), {"ok": ok, "managed": managed})()
    run = lambda s: asyncio.run(FakeHub().start_service("x", s))
    # a managed service that failed: the hub goes on
    assert run(svc(True, True)) is True and run(svc(False, True)) is True
    assert run(svc(False, False)) is False  # an external one: as JupyterHub decides
