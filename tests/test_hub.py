"""The hub of hub/ for real: JupyterHub with the real configurable-http-proxy, started from hub/jupyterhub_config.py in
a temporary state folder on free ports of 18000-18099, driven over HTTP as a browser does (forms with their _xsrf field,
cookies, the hub's REST API). Sign-up, approval, login, refusals, metrics, secrets kept out of the logs, workspaces as
the users' own accounts (root), TensorBoard and Voila through the proxy, the idle culler, PostgreSQL as the hub
database."""
import grp
import html
import importlib.util
import json
import os
import pwd
import re
import secrets
import signal
import socket
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from conftest import BIN, ROOT, fresh_pg_database

CONF = ROOT / "hub" / "jupyterhub_config.d"
# this test file's range; the hub uses port, +1 (proxy API), +2 (hub API), +3, +4 (services)
PORTS = range(18000, 18100)
PASSWORD = "correct-horse-battery-7"
# workspaces run as system accounts: the hub runs as root here and in CI (where a non-root run fails instead of
# skipping)
pytestmark = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="needs root (system accounts)")


def free_base(n: int = 5) -> int:
    "A port p of this file's range with p .. p+n-1 free (each xdist worker keeps to its own half)."
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 2
    lo = PORTS.start + worker * len(PORTS) // 2
    for p in range(lo, lo + len(PORTS) // 2 - n, n):
        socks = []
        try:
            for q in range(p, p + n):
                s = socket.socket(); s.bind(("127.0.0.1", q)); socks.append(s)
            return p
        except OSError: continue
        finally:
            for s in socks: s.close()
    raise RuntimeError(f"no {n} free ports in {PORTS}")


def user_name(tag: str) -> str:
    """A fresh user name with this file's prefix `ha` and a one-letter tag (they may become system accounts: removed at
    the end)."""
    assert re.fullmatch(r"[a-z]", tag), tag
    return f"ha{tag}{secrets.token_hex(3)}"


def spawner_module():
    spec = importlib.util.spec_from_file_location("test_hub_spawner_local", CONF / "20-spawner.local.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


class Hub:
    "A hub from hub/jupyterhub_config.py in `folder`, on free ports; a browser-like client of it."

    def __init__(self, folder: Path, run_as: pwd.struct_passwd | None = None, path: str | None = None, **settings):
        self.folder, self.state, self.data, self.run_as = folder, folder / "state", folder / "data", run_as
        self.port = free_base()
        self.url = f"http://127.0.0.1:{self.port}"
        path = os.pathsep.join(filter(None, [path, str(BIN), os.environ.get("PATH", "")]))
        self.env = {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1",
                    "HEDGERL_DATA_FOLDER": str(self.data), "HEDGERL_HUB_STATE": str(self.state),
                    "HEDGERL_HUB_PORT": str(self.port), "HEDGERL_GATEWAY_PORT": str(self.port + 3),
                    "HEDGERL_SERVICE_PORT": str(self.port + 4),
                    **{f"HEDGERL_{k.upper()}": str(v) for k, v in settings.items()}}
        self.db_url = self.env.get("HEDGERL_HUB_DB_URL", f"sqlite:///{self.state}/jupyterhub.sqlite")
        self.proc, self.log = None, folder / "hub.out"
        self.admin_password = secrets.token_urlsafe(12)
        self.accounts: set[str] = set()

    # -- processes
    def start(self, timeout: float = 90) -> float:
        "Start the hub (the admin's password set first, as `make up` does); the seconds until /hub/health answers."
        from hedgerl.platform import set_hub_password
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        set_hub_password(self.db_url, "admin", self.admin_password)
        as_user = {}
        if self.run_as is not None:  # the hub without root: its folder is its own
            for p in [self.folder, *self.folder.rglob("*")]: os.chown(p, self.run_as.pw_uid, self.run_as.pw_gid)
            as_user = dict(user=self.run_as.pw_uid, group=self.run_as.pw_gid, extra_groups=[])
            self.env["HOME"] = self.run_as.pw_dir
        t0 = time.monotonic()
        self.proc = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(ROOT / "hub" / "jupyterhub_config.py")],
                                     cwd=self.folder, env=self.env, stdout=open(self.log, "a"),
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True, **as_user)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None: raise AssertionError(f"the hub exited "
                                                                  f"{self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/hub/health", timeout=2).status_code == 200: return time.monotonic() - t0
            except requests.ConnectionError: pass
            time.sleep(0.2)
        raise AssertionError(f"the hub did not answer within {timeout} s:\n{self.tail()}")

    def stop(self) -> list[str]:
        "SIGTERM the hub as Ctrl-C would; what is left running of it afterwards (nothing, if it cleans up)."
        if self.proc is None or self.proc.poll() is not None: return self.leftovers()
        self.proc.send_signal(signal.SIGTERM)
        try: self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()
            raise AssertionError(f"the hub did not stop within 60 s:\n{self.tail()}")
        deadline = time.monotonic() + 10
        while (left := self.leftovers()) and time.monotonic() < deadline: time.sleep(0.2)
        return left

    def leftovers(self) -> list[str]:
        "Processes of this hub still running: anything given its API URL (workspaces, services) or its proxy's port."
        api, out = f"JUPYTERHUB_API_URL=http://127.0.0.1:{self.port + 2}/hub/api".encode(), []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid(): continue
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if api in (p / "environ").read_bytes().split(b"\0") or f"--api-port {self.port + 1}" in cmd:
                    out.append(f"{p.name}: {cmd[:200]}")
            except (FileNotFoundError, ProcessLookupError, PermissionError): pass
        return out

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    # -- a browser
    @staticmethod
    def xsrf(s: requests.Session) -> str:
        return s.cookies.get("_xsrf", path="/hub/") or ""

    def form(self, s: requests.Session, path: str, fields: dict) -> requests.Response:
        "GET the page (its _xsrf cookie), POST the form back with the _xsrf field; redirects not followed."
        r = s.get(self.url + path); assert r.status_code == 200, (path, r.status_code)
        # (the spawn page's has none)
        if path != "/hub/spawn": assert 'name="_xsrf"' in r.text, f"{path}: the form has no _xsrf field"
        return s.post(self.url + path, data={**fields, "_xsrf": self.xsrf(s)}, allow_redirects=False)

    def signup(self, name: str, password: str = PASSWORD, confirm: str | None = None) -> str:
        "The sign-up page's answer (its message) for this sign-up."
        r = self.form(requests.Session(), "/hub/signup", {"username": name, "signup_password": password,
                                                          "signup_password_confirmation": password if confirm is None
                                                          else confirm})
        assert r.status_code == 200, r.status_code
        return re.sub(r"\s+", " ", html.unescape(r.text))

    def login(self, name: str, password: str = PASSWORD) -> tuple[requests.Session, requests.Response]:
        s = requests.Session()
        return s, self.form(s, "/hub/login", {"username": name, "password": password})

    def session(self, name: str, password: str = PASSWORD) -> requests.Session:
        s, r = self.login(name, password)
        assert r.status_code == 302 and "jupyterhub-hub-login" in s.cookies, f"login of {name} refused: {r.status_code}"
        return s

    def admin(self) -> requests.Session:
        return self.session("admin", self.admin_password)

    def approve(self, admin: requests.Session, name: str) -> None:
        r = admin.get(f"{self.url}/hub/authorize/{name}", allow_redirects=False)
        assert r.status_code == 302, r.status_code

    def api(self, s: requests.Session, method: str, path: str, **kw) -> requests.Response:
        "The hub's REST API with the login cookie and its XSRF header."
        return s.request(method, f"{self.url}/hub/api{path}", headers={"X-XSRFToken": self.xsrf(s)}, **kw)

    def token(self, s: requests.Session, name: str, **body) -> str:
        r = self.api(s, "POST", f"/users/{name}/tokens", json={"note": "test", **body})
        assert r.status_code == 201, (r.status_code, r.text)
        return r.json()["token"]

    def new_user(self, tag: str) -> tuple[str, requests.Session]:
        "A user signed up, approved by the admin and logged in."
        name = user_name(tag); self.accounts.add(name)
        assert "sent to the admin" in self.signup(name)
        self.approve(self.admin(), name)
        return name, self.session(name)

    def spawn(self, s: requests.Session, name: str, options: dict | None = None, timeout: float = 120) -> dict:
        "Start `name`'s workspace with their login cookie; its server model once ready."
        r = self.api(s, "POST", f"/users/{name}/server", json=options or {})
        assert r.status_code in (201, 202), (r.status_code, r.text, self.tail())
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            srv = self.api(s, "GET", f"/users/{name}").json().get("servers", {}).get("")
            if srv and srv.get("ready"): return srv
            if not srv and time.monotonic() - t0 > 3: raise AssertionError(
                    f"{name}'s workspace stopped while starting:\n{self.tail()}")
            time.sleep(0.3)
        raise AssertionError(f"{name}'s workspace not ready in {timeout} s:\n{self.tail()}")

    def server_pid(self, admin_token: str, name: str) -> int:
        r = requests.get(f"{self.url}/hub/api/users/{name}", headers={"Authorization": f"token {admin_token}"})
        return r.json()["servers"][""]["state"]["pid"]

    def remove_accounts(self) -> list[str]:
        "Delete the system accounts this test made (only names of `user_name`'s form); those that could not be deleted."
        failed = []
        for name in sorted(self.accounts):
            if not re.fullmatch(r"ha[a-z][0-9a-f]{6}", name): raise AssertionError(
                    f"refusing to delete the account {name!r}")
            try: pwd.getpwnam(name)
            except KeyError: continue
            p = subprocess.run(["userdel", "-r", name], capture_output=True, text=True)
            # 12: the home could not be removed
            if p.returncode not in (0, 12): failed.append(f"{name}: {p.stderr.strip()}")
        return failed


@contextmanager
def running_hub(tmp_path, run_as=None, path=None, **settings):
    hub = Hub(tmp_path, run_as, path, **settings)
    try:
        hub.start_s = hub.start()
        yield hub
    finally:
        left = hub.stop()
        undeleted = hub.remove_accounts()
        assert not left, f"processes left after the hub stopped: {left}"
        assert not undeleted, f"accounts not deleted: {undeleted}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("hub")) as h: yield h


def test_signup_approval_login(hub):
    name = user_name("a"); hub.accounts.add(name)
    page = hub.signup(name)
    assert "Your information has been sent to the admin" in page
    # not approved yet: refused, and told why (the password was right)
    s, r = hub.login(name)
    assert r.status_code == 403 and "jupyterhub-hub-login" not in s.cookies
    assert f"User {name} has not been approved by an administrator yet" in r.text
    admin = hub.admin()
    hub.approve(admin, name)
    s = hub.session(name)
    # a user cannot approve anyone: the approval pages need admin rights
    assert s.get(f"{hub.url}/hub/authorize", allow_redirects=False).status_code == 403
    assert s.get(f"{hub.url}/hub/authorize/{name}", allow_redirects=False).status_code == 403
    me = hub.api(s, "GET", "/user").json()
    assert me["name"] == name and me["groups"] == ["researchers"] and me["admin"] is False
    # what the group grants (roles of 30-service.py and 40-gateway.py): the hedgerl service and the gateway
    tok = hub.token(s, name)
    scopes = requests.get(f"{hub.url}/hub/api/user", headers={"Authorization": f"token {tok}"}).json()["scopes"]
    assert {"access:services!service=hedgerl", "access:services!service=dask-gateway"} <= set(scopes), scopes
    assert hub.api(s, "GET", "/users").status_code == 403  # not an admin
    # the admin is an admin, and a researcher too
    assert hub.api(admin, "GET", "/user").json()["admin"] is True
    # refusals
    assert "already in use" in hub.signup(name)
    s, r = hub.login(name, "wrong-password-1")
    assert r.status_code == 403 and "Invalid username or password" in r.text and "jupyterhub-hub-login" not in s.cookies
    s, r = hub.login("ha-nobody", PASSWORD)
    assert r.status_code == 403 and "Invalid username or password" in r.text
    # withdrawn approval: out of the group, the next login refused
    hub.approve(admin, name)
    assert hub.api(admin, "GET", f"/users/{name}").json()["groups"] == []
    assert hub.login(name)[1].status_code == 403


def test_signup_refusals(hub):
    for name, password, message in [
        ("root", PASSWORD, "'root' is a system account of this machine"),
        ("postgres", PASSWORD, "'postgres' is a system account of this machine"),
        ("sudo", PASSWORD, "'sudo' is a system group of this machine"),
        ("admin", PASSWORD, "already in use"),  # its row exists (set_hub_password); without it: test_hub_config.py
        ("Ha Space", PASSWORD, "A user name is a lowercase letter"),
        (user_name("s"), "short7", "too short"),
        (user_name("c"), "password123", "too common"),
    ]:
        assert message in hub.signup(name, password), name
    assert "did not match the confirmation" in hub.signup(user_name("m"), PASSWORD, confirm=PASSWORD + "x")
    # nothing was stored for them: the admin's approval page lists none of them
    page = hub.admin().get(hub.url + "/hub/authorize").text
    assert "postgres" not in page and "Ha Space" not in page


def test_login_throttled(hub):
    name, _ = hub.new_user("t")
    for _ in range(5): hub.login(name, "wrong-password-1")
    s, r = hub.login(name)  # the right password, too late
    assert r.status_code == 403 and "Too many failed logins" in r.text and "jupyterhub-hub-login" not in s.cookies


def test_metrics_need_the_scope(hub):
    assert requests.get(hub.url + "/hub/metrics").status_code == 403  # anonymous
    name, s = hub.new_user("m")
    user_token = hub.token(s, name)
    assert requests.get(hub.url + "/hub/metrics", headers={"Authorization": f"token {user_token}"}).status_code == 403
    prom = (hub.state / "secrets" / "prometheus_token").read_text()
    r = requests.get(hub.url + "/hub/metrics", headers={"Authorization": f"Bearer {prom}"})
    assert r.status_code == 200 and "jupyterhub_total_users" in r.text
    # the prometheus token reads metrics and nothing else
    assert requests.get(hub.url + "/hub/api/users", headers={"Authorization": f"Bearer {prom}"}).status_code == 403


def test_state_and_logs_keep_secrets(hub):
    assert stat.S_IMODE(hub.state.stat().st_mode) == 0o700
    secrets_ = {p.name: p.read_text().strip() for p in (hub.state / "secrets").iterdir()}
    assert {"proxy_token", "cookie_secret", "prometheus_token"} <= set(secrets_)
    assert all(stat.S_IMODE((hub.state / "secrets" / n).stat().st_mode) == 0o600 for n in secrets_)
    assert (hub.state / "jupyterhub.pid").read_text().strip() == str(hub.proc.pid)
    assert (hub.state / "jupyterhub-proxy.pid").exists()
    hub.login("admin", "wrong-admin-password")  # a failed login is logged: never its password
    logs = hub.log.read_text(errors="replace") + (hub.state / "jupyterhub.log").read_text(errors="replace")
    assert "JupyterHub is now running" in (hub.state / "jupyterhub.log").read_text()
    for name, value in [*secrets_.items(), ("admin password", hub.admin_password), ("a password",
                                                                                    "wrong-admin-password")]:
        assert value not in logs, f"{name} is in the hub's log"


def test_workspace_as_the_users_own_account(hub):
    name, s = hub.new_user("w")
    t0 = time.monotonic(); hub.spawn(s, name); spawn_s = time.monotonic() - t0
    print(f"spawn (first, account made): {spawn_s:.1f} s")
    # JupyterLab through the proxy, with the browser's cookie (the OAuth redirects followed)
    r = s.get(f"{hub.url}/user/{name}/lab")
    assert r.status_code == 200 and "JupyterLab" in r.text, (r.status_code, r.url)
    # the server runs as the user's own account, a member of the platform's group, with a private home
    pw, admin_token = pwd.getpwnam(name), hub.token(hub.admin(), "admin")
    pid = hub.server_pid(admin_token, name)
    uids = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("Uid:")).split()[1:]
    assert set(map(int, uids)) == {pw.pw_uid} and pw.pw_uid != 0
    assert grp.getgrgid(pw.pw_gid).gr_name == name and name in grp.getgrnam("hedgerl").gr_mem
    home = Path(pw.pw_dir)
    assert (home == Path("/home") / name and stat.S_IMODE(home.stat().st_mode) == 0o700
            and home.stat().st_uid == pw.pw_uid)
    # the tutorials and the run template, the user's own
    seeded = sorted(p.name for p in (home / "hedgerl").iterdir())
    assert seeded == ["01_first_hedge.ipynb", "02_baselines_and_backtests.ipynb", "evaluation.ipynb", "player.ipynb",
                      "train.ipynb"]
    assert all(p.stat().st_uid == pw.pw_uid for p in (home / "hedgerl").iterdir())
    assert {json.loads(p.read_text())["metadata"]["kernelspec"]["name"]
            for p in (home / "hedgerl").iterdir()} == {"hedgerl"}  # the one kernel here
    # ... and what the user's server shows of them; its kernel is the environment's `hedgerl`
    tok = {"Authorization": f"token {hub.token(s, name)}"}
    listing = requests.get(f"{hub.url}/user/{name}/api/contents/hedgerl", headers=tok).json()
    assert sorted(c["name"] for c in listing["content"]) == seeded
    specs = requests.get(f"{hub.url}/user/{name}/api/kernelspecs", headers=tok).json()
    assert specs["default"] == "hedgerl" and list(specs["kernelspecs"]) == ["hedgerl"]
    assert specs["kernelspecs"]["hedgerl"]["spec"]["argv"][0] == str(BIN / "python")
    # another platform account cannot read this home, nor a notebook in it
    other = spawner_module().ensure_account(user_name("o")); hub.accounts.add(other.pw_name)
    for cmd in (["ls", str(home)], ["cat", str(home / "hedgerl" / "train.ipynb")]):
        p = subprocess.run(cmd, user=other.pw_uid, group=other.pw_gid, extra_groups=[grp.getgrnam("hedgerl").gr_gid],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "Permission denied" in p.stderr, (cmd, p.returncode, p.stderr)
    # another user cannot open this workspace with their own login
    other_name, other_s = hub.new_user("x")
    r = other_s.get(f"{hub.url}/user/{name}/lab", allow_redirects=True)
    assert r.status_code in (403, 404) or "/user/" + name not in r.url, (r.status_code, r.url)
    assert requests.get(f"{hub.url}/user/{name}/api/contents/hedgerl",
                        headers={"Authorization": f"token {hub.token(other_s, other_name)}"}).status_code == 403
    # stopped through the API: the process is gone
    assert hub.api(s, "DELETE", f"/users/{name}/server").status_code in (202, 204)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline: time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists()


def test_existing_account_outside_the_platform_refused(hub):
    name, s = hub.new_user("e")
    # the account appears on the machine after sign-up, not made by the platform: the hub must not take it over
    subprocess.run(["useradd", "--create-home", "--user-group", name], check=True, capture_output=True)
    hub.accounts.add(name)
    r = hub.api(s, "POST", f"/users/{name}/server", json={})
    events = s.get(f"{hub.url}/hub/api/users/{name}/server/progress", headers={"X-XSRFToken": hub.xsrf(s)},
                   timeout=60).text
    assert "is not a platform account" in events or "is not a platform account" in r.text, (r.status_code, r.text,
            events[-800:])
    assert hub.api(s, "GET", f"/users/{name}").json()["servers"] == {}


def test_tensorboard_and_voila_through_the_proxy(hub):
    name, s = hub.new_user("v")
    hub.spawn(s, name)
    tok = {"Authorization": f"token {hub.token(s, name)}"}
    base = f"{hub.url}/user/{name}"
    # TensorBoard in the launcher, started on demand, on the user's runs folder
    info = requests.get(f"{base}/server-proxy/servers-info", headers=tok).json()
    tb = next(x for x in info["server_processes"] if x["name"] == "tensorboard")
    assert tb["launcher_entry"]["enabled"] and tb["launcher_entry"]["title"] == "TensorBoard"
    r = requests.get(f"{base}/tensorboard/", headers=tok, timeout=90)
    assert r.status_code == 200 and "tensorboard" in r.text.lower(), (r.status_code, r.text[:300])
    r = requests.get(f"{base}/tensorboard/data/environment", headers=tok, timeout=30)
    assert r.status_code == 200 and r.json()["data_location"] == f"/home/{name}/.hedgerl/runs"
    # Voila renders a notebook of the user's with the hedgerl kernel
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": "import hedgerl, os\nprint('answer', 6 * 7, os.getuid())"}],
          "metadata": {"kernelspec": {"name": "hedgerl", "display_name": "hedgerl", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    assert requests.put(f"{base}/api/contents/hello.ipynb", headers=tok, json={"type": "notebook",
                                                                               "content": nb}).status_code == 201
    r = requests.get(f"{base}/voila/render/hello.ipynb", headers=tok, timeout=120)
    assert r.status_code == 200 and f"answer 42 {pwd.getpwnam(name).pw_uid}" in r.text, r.text[-2000:]


@pytest.mark.slow
def test_idle_workspace_culled(tmp_path):
    with running_hub(tmp_path, hub_idle_timeout=20) as hub:
        name, s = hub.new_user("i")
        hub.spawn(s, name)
        deadline = time.monotonic() + 90
        while hub.api(s, "GET", f"/users/{name}").json()["servers"] and time.monotonic() < deadline: time.sleep(2)
        assert hub.api(s, "GET", f"/users/{name}").json()["servers"] == {}, hub.tail()
        assert "idle-culler" in hub.log.read_text() and f"Culling server {name}" in hub.log.read_text()


def test_postgresql_hub_database(tmp_path):
    with fresh_pg_database("hedgerl_hub", "the hub's database must be tested on PostgreSQL") as url:
        with running_hub(tmp_path, hub_db_url=url) as hub:
            name, s = hub.new_user("p")
            assert hub.api(s, "GET", "/user").json()["groups"] == ["researchers"]
        import sqlalchemy as sa
        eng = sa.create_engine(url)
        with eng.connect() as conn:
            approved = dict(conn.execute(sa.text("select username, is_authorized from users_info")).all())
            groups = conn.execute(sa.text("select g.name from groups g join user_group_map m on m.group_id = g.id "
                                          "join users u on u.id = m.user_id where u.name = :n"),
                                          {"n": name}).scalars().all()
        eng.dispose()
        assert approved == {"admin": True, name: True} and groups == ["researchers"]
        assert not (tmp_path / "state" / "jupyterhub.sqlite").exists()


@pytest.mark.slow
def test_not_root_single_account(tmp_path):
    """A hub started without root: every workspace runs as the hub's account, and the hub says so at start and on its
    pages."""
    import tempfile
    acct = spawner_module().ensure_account(user_name("n"), group="hedgerl")  # any unprivileged account will do
    folder = Path(tempfile.mkdtemp(prefix="ha-nonroot-", dir="/tmp"))  # pytest's own folders are root's (0700)
    try:
        with running_hub(folder, run_as=acct) as hub:
            hub.accounts.add(acct.pw_name)
            assert "users are NOT isolated" in hub.log.read_text()
            name, s = hub.new_user("u")
            assert "NOT isolated" in html.unescape(s.get(hub.url + "/hub/home").text)
            hub.spawn(s, name)
            pid = hub.server_pid(hub.token(hub.admin(), "admin"), name)
            uids = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if l.startswith("Uid:")).split()[1:]
            assert set(map(int, uids)) == {acct.pw_uid}
            with pytest.raises(KeyError): pwd.getpwnam(name)  # no account was made for the user
            home = hub.data / "workspaces" / name
            assert sorted(p.name for p in (home / "hedgerl").iterdir())[-3:] == ["evaluation.ipynb", "player.ipynb",
                                                                                 "train.ipynb"]
            env = dict(l.split("=", 1) for l in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in l)
            assert env["HOME"] == str(home) and env["HEDGERL_DATA_FOLDER"] == str(home / ".hedgerl")
            r = s.get(f"{hub.url}/user/{name}/lab")
            assert r.status_code == 200 and "JupyterLab" in r.text
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(folder)])


@pytest.mark.slow
def test_withdrawn_approval_ends_the_session(hub):
    name, s = hub.new_user("r")
    assert s.get(f"{hub.url}/hub/home", allow_redirects=False).status_code == 200
    hub.approve(hub.admin(), name)  # withdrawn
    time.sleep(62)  # Authenticator.auth_refresh_age
    r = s.get(f"{hub.url}/hub/home", allow_redirects=False)
    assert r.status_code == 302 and "/hub/login" in r.headers["Location"], (r.status_code, r.headers.get("Location"))


@pytest.mark.slow
def test_gpu_profile_offered_where_a_gpu_is_listed(tmp_path):
    """With `nvidia-smi -L` listing a GPU the spawn page offers both profiles; the GPU workspace sees the GPU, the CPU
    one not."""
    d = tmp_path / "gpubin"; d.mkdir()
    smi = d / "nvidia-smi"; smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] && echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: "
                                           "GPU-0)'\n")
    smi.chmod(0o755)
    with running_hub(tmp_path / "hub", path=str(d)) as hub:
        name, s = hub.new_user("g")
        page = html.unescape(s.get(f"{hub.url}/hub/spawn").text)
        assert 'value="cpu" checked' in page and 'value="gpu"' in page and "GPU workspace" in page
        admin_token = hub.token(hub.admin(), "admin")
        for profile, cuda in [("gpu", None), ("cpu", "")]:
            r = hub.form(s, "/hub/spawn", {"profile": profile})  # the spawn form, as a browser posts it
            assert r.status_code == 302, (r.status_code, r.text[-500:])
            deadline = time.monotonic() + 60
            while not hub.api(s, "GET", f"/users/{name}").json()["servers"].get("",
                    {}).get("ready") and time.monotonic() < deadline:
                time.sleep(0.3)
            pid = hub.server_pid(admin_token, name)
            env = dict(l.split("=", 1) for l in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in l)
            assert env["HEDGERL_WORKSPACE_PROFILE"] == profile and env.get("CUDA_VISIBLE_DEVICES") == cuda, profile
            assert hub.api(s, "DELETE", f"/users/{name}/server").status_code in (202, 204)
            while hub.api(s, "GET", f"/users/{name}").json()[
                    "servers"] and time.monotonic() < deadline + 30: time.sleep(0.3)
