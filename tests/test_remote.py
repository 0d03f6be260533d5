"""The registry's boundary end to end: a real uvicorn process serving `hedgerl.remote.registry_router`, and clients that
run as two real system accounts (as a workspace's kernel would), recording and reading through `RemoteRegistry` with
their own tokens. User B must not read, list, change, download or hang anything on A's private rows, nor reach A's
files or the registry's database directly. The same checks through a real JupyterHub and proxy that start the platform's
service (hub/jupyterhub_config.d/30-service.py) with the URL and token scopes of 35-registry.py; that file on a bare
Config; and (slow) the training template recording through the service from a papermill kernel running as A.
Accounts made here are named hd*, ports come from 18300-18399."""
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import secrets
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PORTS = range(18300, 18400)  # this test's port range
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --- the hub config file, on a bare Config -------------------------------------------------------------------------

def _config_module():
    spec = importlib.util.spec_from_file_location("hedgerl_test_35_registry",
                                                  ROOT / "hub" / "jupyterhub_config.d" / "35-registry.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _ctx(tmp_path, deployment="local", **env):
    from hedgerl.core import load_settings
    from hedgerl.platform import PlatformContext
    s = load_settings(ROOT / "settings.ini", environ={"HEDGERL_DATA_FOLDER": str(tmp_path),
                                                      "HEDGERL_HUB_DEPLOYMENT": deployment, **env})
    return PlatformContext(settings=s, root=ROOT, state=tmp_path / "hub", as_root=True)


def test_hub_config_points_workspaces_at_the_service(tmp_path):
    from jupyterhub.spawner import Spawner
    from traitlets.config import Config
    mod = _config_module()
    c = Config()
    c.Spawner.environment.update({"HEDGERL_DATA_FOLDER": "kept"})  # another file's entries survive
    mod.configure(c, _ctx(tmp_path, HEDGERL_SERVICE_PORT="18311"))
    sp = Spawner(config=c)
    assert sp.environment == {"HEDGERL_DATA_FOLDER": "kept",
                              "HEDGERL_REGISTRY_URL": "http://127.0.0.1:18311/services/hedgerl/"}
    # JupyterHub's default server token (activity, access to the user's own server) plus the service
    assert set(sp.server_token_scopes) == {"users:activity!user", "access:servers!server",
                                           "access:services!service=hedgerl"}

    c = Config()
    # set by a file before
    c.Spawner.server_token_scopes = ["users:activity!user", "access:services!service=dask-gateway"]
    mod.configure(c, _ctx(tmp_path))
    assert Spawner(config=c).server_token_scopes == ["users:activity!user", "access:services!service=dask-gateway",
                                                     "access:servers!server", "access:services!service=hedgerl"]
    c = Config()
    c.Spawner.server_token_scopes.extend(["access:services!service=dask-gateway"])  # extended lazily before
    mod.configure(c, _ctx(tmp_path))
    assert "access:services!service=dask-gateway" in Spawner(config=c).server_token_scopes
    c = Config(); c.Spawner.server_token_scopes = lambda spawner: []
    with pytest.raises(ValueError, match="is a callable: add the hedgerl service's scopes"): mod.configure(c,
            _ctx(tmp_path))

    for deployment, url in (("kubernetes", "http://hub:8765/services/hedgerl/"), ("slurm",
            f"http://{socket.getfqdn()}:8000/services/hedgerl/")):
        c = Config(); mod.configure(c, _ctx(tmp_path, deployment))
        assert c.Spawner.environment.to_dict()["update"]["HEDGERL_REGISTRY_URL"] == url, deployment
    c = Config(); mod.configure(c, _ctx(tmp_path, HEDGERL_SERVICE_HOST="0.0.0.0"))
    assert Spawner(config=c).environment["HEDGERL_REGISTRY_URL"] == "http://127.0.0.1:8765/services/hedgerl/"


# --- a real service, real accounts ---------------------------------------------------------------------------------

APP = textwrap.dedent('''
    """A hedgerl registry service behind a stand-in for the hub: a token names its user (HD_TOKENS), anything else is
    401."""
    import json, os
    from fastapi import FastAPI, Header, HTTPException
    from hedgerl.remote import API, registry_router
    TOKENS = json.loads(os.environ["HD_TOKENS"])
    def hub_user(authorization: str | None = Header(None)) -> str:
        name = TOKENS.get((authorization or "").removeprefix("token ").strip())
        if name is None: raise HTTPException(401, "no valid hub token")
        return name
    def create() -> FastAPI:
        app = FastAPI()
        # [registry] url: HEDGERL_REGISTRY_URL
        app.include_router(registry_router(hub_user), prefix="/services/hedgerl/" + API)
        return app
''')


@contextlib.contextmanager
def _port_lock():
    "Held from choosing ports until the process listens on them: side-by-side pytest-xdist workers never pick the same."
    with open(Path(tempfile.gettempdir()) / "hedgerl-test-remote-ports.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(f, fcntl.LOCK_UN)


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", port)); return port
            except OSError: continue
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def _account(role: str) -> pwd.struct_passwd:
    name = f"hd{role}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", name], check=True,
                   capture_output=True)
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    return pw


@pytest.fixture(scope="module")
def accounts():
    if os.geteuid() != 0: pytest.skip("needs root: the clients run as two system accounts, as platform workspaces do")
    made = []
    try:
        made += [_account("a"), _account("b")]
        yield made
    finally:
        for pw in made: subprocess.run(["userdel", "-r", pw.pw_name], capture_output=True)


@pytest.fixture(scope="module")
def service(accounts):
    """The service as the platform runs it: its registry a SQLite file in a folder anyone may list (the file's own mode
    guards it)."""
    state = Path(tempfile.mkdtemp(prefix="hd-remote-"))
    state.chmod(0o755)
    (state / "app.py").write_text(APP)
    tokens = {secrets.token_hex(16): pw.pw_name for pw in accounts}
    db = state / "registry.sqlite"
    env = {**os.environ, "HD_TOKENS": json.dumps(tokens), "HEDGERL_REGISTRY_URL": f"sqlite:///{db}",
           "HEDGERL_SETTINGS": str(ROOT / "settings.ini")}
    log, proc = open(state / "service.log", "wb"), None
    try:
        import httpx
        with _port_lock():
            port = _free_port()
            proc = subprocess.Popen([str(BIN / "python"), "-m", "uvicorn", "app:create", "--factory", "--app-dir",
                                     str(state),
                                     "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=state)
            url = f"http://127.0.0.1:{port}/services/hedgerl/"
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None: raise AssertionError(f"the service exited "
                        f"{proc.returncode}:\n{(state / 'service.log').read_text()}")
                try:
                    if httpx.get(url + "api/v1/registry", timeout=2).status_code == 401: break
                except httpx.TransportError: pass
                if time.monotonic() - t0 > 60: raise AssertionError(f"the service did not answer in 60 "
                                                                    f"s:\n{(state / 'service.log').read_text()}")
                time.sleep(0.2)
        yield dict(url=url, db=db, tokens={v: k for k, v in tokens.items()}, started_s=round(time.monotonic() - t0, 2),
                   log=state / "service.log")
    finally:
        if proc is not None:
            proc.terminate()
            try: proc.wait(10)
            except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()
        subprocess.run(["rm", "-rf", str(state)])


def as_account(pw, service, code: str, *args, timeout=120, env=None) -> dict:
    """Run `code` in a fresh Python as the account `pw`, with what a workspace has (its token, the service as
    [registry] url); its JSON."""
    e = {"HOME": pw.pw_dir, "USER": pw.pw_name, "PATH": f"{BIN}:/usr/bin:/bin",
         "HEDGERL_SETTINGS": str(ROOT / "settings.ini"),
         "HEDGERL_DATA_FOLDER": f"{pw.pw_dir}/.hedgerl", "HEDGERL_REGISTRY_URL": service["url"],
         "JUPYTERHUB_API_TOKEN": service["tokens"][pw.pw_name], **(env or {})}
    p = subprocess.run([str(BIN / "python"), "-c", code, *args], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                       umask=0o077,
                       cwd=pw.pw_dir, env=e, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{pw.pw_name}'s process exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


ALICE = textwrap.dedent('''
    import hashlib, json, os, pathlib, tempfile
    from hedgerl.registry import open_registry
    reg = open_registry()  # HEDGERL_REGISTRY_URL: the service
    out = {"type": type(reg).__name__, "user": reg.user}
    runs = pathlib.Path(os.environ["HEDGERL_DATA_FOLDER"]) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="e2e-", dir=runs))
    model = folder / "model.zip"
    model.write_bytes(os.urandom(300_000))
    with reg.start_run("e2e", {"lr": 0.1}, name="private") as run:
        run.log(0, **{"train/loss": 1.0}); run.log(1, **{"train/loss": 0.5})
        run.set_outputs({"folder": str(folder)})
        m = reg.register_model(run, "ntb", "gbm", model)
        ms = reg.register_model(run, "ntb", "gbm", model, shared=True)
        reg.record_evaluation("gbm", "ntb", 0.5, {"cvar": 1.0}, n_paths=100, seed=1, run=run, model=m)
    with reg.start_run("e2e", {}, name="shared", shared=True) as shared: shared.log(0, x=1.0)
    out.update(private=run.id, shared=shared.id, model=m["id"], shared_model=ms["id"], file=str(model),
               checksum=hashlib.sha256(model.read_bytes()).hexdigest(), status=reg.run(run.id).status,
               n_metrics=len(reg.metrics(run.id)), model_file=str(reg.model_file(m["id"])), pid=os.getpid(),
               host_pid=[str(reg.runs(run_id=run.id).host[0]), int(reg.runs(run_id=run.id).pid[0])])
    print(json.dumps(out))
''')

BOB = textwrap.dedent('''
    import hashlib, json, os, sys
    import httpx
    from hedgerl.registry import open_registry
    from hedgerl.remote import API, RemoteRun
    a = json.loads(sys.argv[1])
    reg = open_registry()
    res = {"user": reg.user}
    def attempt(name, fn):
        try: fn(); res[name] = "ALLOWED"
        except Exception as e: res[name] = f"{type(e).__name__}: {e}"
    handle = RemoteRun(reg, a["private"], "e2e", None)
    attempt("run", lambda: reg.run(a["private"]))
    attempt("metrics", lambda: reg.metrics(a["private"]))
    attempt("log", lambda: handle.log(9, x=1.0))
    attempt("outputs", lambda: handle.set_outputs({"x": 1}))
    attempt("finish", lambda: handle.finish())
    attempt("fail", lambda: handle.fail("bob"))
    attempt("model", lambda: reg.model(a["model"]))
    attempt("model_file", lambda: reg.model_file(a["model"]))
    attempt("evaluate_on_run", lambda: reg.record_evaluation("gbm", "x", 1.0, run=a["private"]))
    attempt("evaluate_model", lambda: reg.record_evaluation("gbm", "x", 1.0, model=a["model"]))
    attempt("shared_log", lambda: reg.run(a["shared"]).log(1, x=1.0))
    attempt("shared_fail", lambda: reg.run(a["shared"]).fail("bob"))
    attempt("read_file", lambda: open(a["file"], "rb").read(1))
    attempt("read_db", lambda: open(a["db"], "rb").read(1))
    attempt("other_view", lambda: reg.runs(user=a["user"]))
    res["listed"] = sorted(reg.runs().id.tolist())
    res["models"] = sorted(reg.models().id.tolist())
    res["evaluations"] = len(reg.evaluations())
    p = reg.model_file(a["shared_model"])  # a shared model's file: through the service, into B's own cache
    res["shared_file"] = [str(p), hashlib.sha256(p.read_bytes()).hexdigest(), oct(p.stat().st_mode & 0o777)]
    # past the client: HTTP as B with A's path and checksum, and A's name in the query
    h = {"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]}
    api = reg.url + API
    r = httpx.post(f"{api}/models", headers=h,
                   json={"algorithm": "x", "scenario": "s", "artifact_path": a["file"], "checksum": a["checksum"]})
    res["steal_register"] = [r.status_code, r.json()["detail"]]
    r = httpx.get(f"{api}/runs", headers=h, params={"user": a["user"]})
    res["steal_view"] = [r.status_code, r.json()["detail"][0]["loc"]]  # asking for A's view: refused, never answered
    res["anonymous"] = httpx.get(f"{api}/runs").status_code
    res["a_token_guess"] = httpx.get(f"{api}/runs", headers={"Authorization": "token " + "0" * 32}).status_code
    print(json.dumps(res))
''')


def check_boundary(accounts, service) -> None:
    """A records private and shared rows and a model as her own account; B, as his, reaches none of hers but the shared
    ones, read-only."""
    from hedgerl.registry import Registry
    alice, bob = accounts
    a = as_account(alice, service, ALICE)
    assert (a["type"], a["user"], a["status"], a["n_metrics"]) == ("RemoteRegistry", alice.pw_name, "finished", 2)
    assert a["model_file"] == a["file"]  # her own file, in place
    assert a["host_pid"] == [socket.gethostname(), a["pid"]]  # the reaper watches her process, not the service's
    a["db"] = str(service["db"])
    assert stat.S_IMODE(service["db"].stat().st_mode) == 0o600

    b = as_account(bob, service, BOB, json.dumps(a))
    nb = bob.pw_name
    assert b["user"] == nb
    hidden = f"no run {a['private']} visible to user '{nb}'"
    for k in ("run", "log", "outputs", "finish", "fail", "evaluate_on_run"): assert b[k].startswith(
            "KeyError") and hidden in b[k], (k, b[k])
    assert b["metrics"].startswith("KeyError") and f"visible to user '{nb}'" in b["metrics"]
    for k in ("model", "model_file", "evaluate_model"): assert b[k].startswith(
            "KeyError") and f"no model {a['model']} visible" in b[k], (k, b[k])
    for k in ("shared_log", "shared_fail"): assert b[k].startswith("PermissionError") and "(shared, read-only)" in b[
            k], (k, b[k])
    for k in ("read_file", "read_db"): assert b[k].startswith("PermissionError"), (k, b[k])
    assert b["other_view"].startswith("PermissionError")
    assert set(b["listed"]) >= {a["shared"]} and a["private"] not in b["listed"] and a["model"] not in b["models"], b
    assert a["shared_model"] in b["models"] and b["evaluations"] == 0
    path, digest, mode = b["shared_file"]
    assert path.startswith(bob.pw_dir + "/.hedgerl/cache/models/") and digest == a["checksum"] and mode == "0o600"
    assert b["steal_register"][0] == 400 and f"no regular file of user '{nb}' there" in b["steal_register"][1]
    assert b["steal_view"] == [422, ["query", "user"]]
    assert (b["anonymous"], b["a_token_guess"]) == (401, 401)

    # what the database holds: A's rows as A left them
    reg = Registry(f"sqlite:///{service['db']}", user=alice.pw_name)
    rows = reg.runs().set_index("id")
    assert rows.loc[a["private"], "status"] == "finished" and rows.loc[a["shared"], "status"] == "finished"
    assert rows.loc[a["private"], "outputs"] == {"folder": str(Path(a["file"]).parent)}
    assert len(reg.metrics(a["private"])) == 2 and len(reg.metrics(a["shared"])) == 1
    assert {a["model"], a["shared_model"]} <= set(reg.models().id)
    assert len(Registry(reg.url, user=nb).evaluations()) == 0  # B recorded none, and A's is private
    reg.engine.dispose()


def test_user_b_cannot_reach_user_a_private_rows(accounts, service):
    check_boundary(accounts, service)
    assert "Traceback" not in service["log"].read_text()


@pytest.mark.slow
def test_training_template_records_through_the_service(accounts, service):
    """The acceptance check: nbs/runs/train.ipynb executed by papermill in a kernel of A's, its [registry] url the
    service."""
    from hedgerl.registry import Registry
    alice, bob = accounts
    out = f"{alice.pw_dir}/.hedgerl/runs/nb"
    code = textwrap.dedent(f'''
        import json, os, sys, time
        import papermill as pm
        t0 = time.monotonic()
        os.makedirs({out!r})
        pm.execute_notebook({str(ROOT / "nbs" / "runs" / "train.ipynb")!r}, {out + ".ipynb"!r}, kernel_name="python3",
                            language="python", progress_bar=False, cwd={out!r},
                            parameters=dict(agent="ntb", scenario="cao2021-gbm-1m-1d", budget=2,
                                            params={{"n_paths": 500, "hidden": 8}}, valid_paths=200, test_paths=1000,
                                            out={out!r}, registry_url=os.environ["HEDGERL_REGISTRY_URL"],
                                            experiment="nb-e2e", progress=False))
        m = json.load(open({out + "/metrics.json"!r}))
        print(json.dumps({{"run_id": m["run_id"], "model_id": m["model_id"], "evaluation_id": m["evaluation_id"],
                          "seconds": round(time.monotonic() - t0, 1)}}))
    ''')
    r = as_account(alice, service, code, timeout=600)
    reg = Registry(f"sqlite:///{service['db']}", user=alice.pw_name)
    row = reg.runs(run_id=r["run_id"]).iloc[0]
    assert (row.owner, row.status, row.experiment) == (alice.pw_name, "finished", "nb-e2e")
    assert len(reg.metrics(r["run_id"])) > 0  # the agent's fit logged through the service
    m = reg.model(r["model_id"])
    assert m["artifact"] == f"{out}/model.zip" and m["owner"] == alice.pw_name
    assert reg.model_file(r["model_id"]).stat().st_uid == alice.pw_uid
    assert reg.evaluations(run_id=r["run_id"]).id.tolist() == [r["evaluation_id"]]
    other = Registry(reg.url, user=bob.pw_name)
    assert r["run_id"] not in other.runs().id.tolist() and len(other.evaluations(run_id=r["run_id"])) == 0
    reg.engine.dispose(); other.engine.dispose()
    print(json.dumps({"train_notebook_through_service_s": r["seconds"]}))


# --- the same through a real hub -----------------------------------------------------------------------------------

CHP = BIN.parent / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
HUB_BASE = '''
def configure(c, ctx):
    h = ctx.settings.hub
    c.JupyterHub.bind_url = f"http://127.0.0.1:{h.port}"
    c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{h.port + 2}"
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{h.port + 1}"
    c.ConfigurableHTTPProxy.command = [%(chp)r]
    c.ConfigurableHTTPProxy.auth_token = ctx.secret("proxy_token")
    c.JupyterHub.cookie_secret = bytes.fromhex(ctx.secret("cookie_secret"))
    c.JupyterHub.db_url = f"sqlite:///{ctx.state}/jupyterhub.sqlite"
    c.JupyterHub.pid_file = str(ctx.state / "jupyterhub.pid")
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = %(password)r
    c.Authenticator.allowed_users = set(%(users)r)
    c.JupyterHub.services.append({"name": "hd-admin", "api_token": %(admin_token)r, "display": False})
    c.JupyterHub.load_roles.append({"name": "admin", "services": ["hd-admin"]})
'''


def _free_ports(n: int) -> list[int]:
    "`n` free ports of this test's range, the first three consecutive (the proxy, its API, the hub's API)."
    def free(p):
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", p)); return True
            except OSError: return False
    for base in range(PORTS.start + os.getpid() % 40, PORTS.stop - 3):
        if all(free(p) for p in range(base, base + 3)):
            rest = [p for p in PORTS if not base <= p < base + 3 and free(p)][:n - 3]
            if len(rest) == n - 3: return [base, base + 1, base + 2, *rest]
    raise RuntimeError(f"no free ports in {PORTS.start}-{PORTS.stop - 1}")


@pytest.fixture(scope="module")
def hub_service(accounts, tmp_path_factory):
    """A real JupyterHub and proxy starting the hedgerl service from hub/ (30-service.py, 35-registry.py); both users
    approved."""
    import requests
    from jupyterhub.spawner import Spawner
    from traitlets.config import Config
    if not CHP.exists(): pytest.skip(f"{CHP}: configurable-http-proxy is not installed (make install)")
    tmp = tmp_path_factory.mktemp("hub")
    proc, log = None, open(tmp / "hub.log", "ab")
    try:
        with _port_lock():  # until the hub listens
            port, _, _, service_port = _free_ports(4)
            admin_token = secrets.token_hex(16)
            conf = tmp / "jupyterhub_config.d"; conf.mkdir()
            (conf / "00-test-base.py").write_text(HUB_BASE % dict(chp=str(CHP), password=secrets.token_hex(8),
                                                                  users=[pw.pw_name for pw in accounts],
                                                                  admin_token=admin_token))
            for f in ("30-service.py", "35-registry.py"): (conf / f).write_text((
                    ROOT / "hub" / "jupyterhub_config.d" / f).read_text())
            (tmp / "jupyterhub_config.py").write_text("from pathlib import Path\nfrom hedgerl.platform import "
                                                      "PlatformContext, load_config_dir\n"
                                                      "load_config_dir(get_config(), Path(__file__).parent / "
                                                      "'jupyterhub_config.d', PlatformContext())\n")
            env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                   "HEDGERL_DATA_FOLDER": str(tmp / "data"),
                   "HEDGERL_HUB_PORT": str(port), "HEDGERL_SERVICE_PORT": str(service_port),
                   "HEDGERL_SETTINGS": str(ROOT / "settings.ini")}
            env.pop("HEDGERL_REGISTRY_URL", None)
            # what a workspace is given: the URL from 35-registry.py, as the hub resolves it
            from hedgerl.core import load_settings
            from hedgerl.platform import PlatformContext
            c = Config()
            _config_module().configure(c, PlatformContext(settings=load_settings(ROOT / "settings.ini", environ=env),
                                                          root=ROOT, state=tmp / "data" / "hub"))
            workspace = Spawner(config=c)
            url = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(tmp / "jupyterhub_config.py")], cwd=tmp,
                                    env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            api = lambda method, path, **kw: requests.request(method, f"{url}/hub/api{path}",
                                                              headers={"Authorization": f"token {admin_token}"},
                                                              timeout=10, **kw)
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None: raise AssertionError(f"jupyterhub exited "
                        f"{proc.returncode}:\n{(tmp / 'hub.log').read_text()[-4000:]}")
                try:
                    if requests.get(f"{url}/services/hedgerl/api/v1/health", timeout=2).status_code == 200: break
                except requests.ConnectionError: pass
                if time.monotonic() - t0 > 120: raise AssertionError(f"the hub and the service did not answer in 120 "
                                                                     f"s:\n{(tmp / 'hub.log').read_text()[-4000:]}")
                time.sleep(0.2)
        started = round(time.monotonic() - t0, 1)
        names = [pw.pw_name for pw in accounts]
        assert api("POST", "/users", json={"usernames": names}).status_code in (201, 409)
        assert api("POST", "/groups/researchers/users", json={"users": names}).status_code == 200  # approved
        # a workspace's token: the scopes 35-registry.py asks for (JupyterHub keeps those the user holds; !server needs
        # a server)
        scopes = [s for s in workspace.server_token_scopes if not s.endswith("!server")]
        tokens = {}
        for n in names:
            r = api("POST", f"/users/{n}/tokens", json={"note": "hd workspace-like", "scopes": scopes})
            assert r.status_code == 201, r.text
            tokens[n] = r.json()["token"]
        yield dict(url=workspace.environment["HEDGERL_REGISTRY_URL"], proxy=f"{url}/services/hedgerl/",
                   db=tmp / "data" / "registry.sqlite",
                   tokens=tokens, api=api, started_s=started, log=tmp / "hub.log",
                   service_port=service_port)
    finally:
        if proc is not None:
            proc.terminate()
            try: proc.wait(30)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, 9); proc.wait()
        log.close()


def test_boundary_through_a_real_hub(accounts, hub_service):
    """The same checks with the hub's tokens, the platform's service (hedgerl.service's hub_user) and 35-registry.py's
    URL and scopes."""
    import requests
    # 35-registry.py: straight to the service
    assert hub_service["url"] == f"http://127.0.0.1:{hub_service['service_port']}/services/hedgerl/"
    check_boundary(accounts, hub_service)
    alice = accounts[0].pw_name
    h = {"Authorization": f"token {hub_service['tokens'][alice]}"}
    # the same API through the proxy
    r = requests.get(f"{hub_service['proxy']}api/v1/registry/runs", headers=h, timeout=10)
    assert r.status_code == 200 and {row["owner"] for row in r.json()["rows"]} == {alice}
    r = hub_service["api"]("POST", f"/users/{alice}/tokens", json={"scopes": [f"read:users:name!user={alice}"]})
    narrow = r.json()["token"]  # a token of A's without the service's scope
    r = requests.get(f"{hub_service['proxy']}api/v1/registry/runs", headers={"Authorization": f"token {narrow}"},
                     timeout=10)
    assert r.status_code == 403 and "detail" in r.json(), r.text
    print(json.dumps({"hub_and_service_up_s": hub_service["started_s"]}))


@pytest.mark.slow
def test_hedgerl_train_records_through_the_service(accounts, service):
    """The acceptance check: `hedgerl train` as A, whose [registry] url is the service: one run of hers, finished, with
    its model."""
    from hedgerl.registry import Registry
    alice, bob = accounts
    code = textwrap.dedent(f'''
        import json, subprocess, time
        t0 = time.monotonic()
        p = subprocess.run([{str(BIN / "hedgerl")!r}, "train", "ntb", "cao2021-gbm-1m-1d", "--budget", "2",
                            "--param", "n_paths=500", "--param", "hidden=8", "--valid-paths", "200",
                            "--test-paths", "1000", "--experiment", "cli-e2e"],
                           capture_output=True, text=True, timeout=500)
        print(json.dumps({{"rc": p.returncode, "out": p.stdout[-2000:], "err": p.stderr[-2000:],
                          "seconds": round(time.monotonic() - t0, 1)}}))
    ''')
    r = as_account(alice, service, code, timeout=600)
    assert r["rc"] == 0, r
    reg = Registry(f"sqlite:///{service['db']}", user=alice.pw_name)
    runs = reg.runs(experiment="cli-e2e")
    assert len(runs) == 1, runs
    row = runs.iloc[0]
    assert (row.owner, row.status) == (alice.pw_name, "finished") and row.outputs["folder"].startswith(
            f"{alice.pw_dir}/.hedgerl/runs/")
    assert len(reg.metrics(int(row.id))) > 0 and len(reg.models().query("run_id == @row.id")) == 1
    assert int(row.id) not in Registry(reg.url, user=bob.pw_name).runs().id.tolist()
    reg.engine.dispose()
    print(json.dumps({"hedgerl_train_through_service_s": r["seconds"]}))
