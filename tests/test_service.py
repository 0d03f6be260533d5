"""The hedgerl service through a real JupyterHub and configurable-http-proxy: the hub starts the service from
hub/jupyterhub_config.d/30-service.py, users call it with their tokens or log in with a browser.

Most tests run on a minimal base config (shared-password login, two allowed users, an admin service that makes tokens)
beside the service's file, so the service's file is checked on its own and quickly; one slow test runs the same checks
through the platform's hub/jupyterhub_config.py (sign-up, approval, Chromium). Ports come from 18200-18299."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHP = BIN.parent / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
PREFIX = "/services/hedgerl/"
PASSWORD = "hc-" + os.urandom(8).hex()
ADMIN_TOKEN = os.urandom(16).hex()
ANN, BOB = "hcann", "hcbob"  # ann is a researcher, bob is not

pytestmark = pytest.mark.skipif(not CHP.exists(), reason=f"{CHP}: configurable-http-proxy is not installed (make "
                                f"install)")


def free_ports(n: int, lo: int = 18200, hi: int = 18300) -> list[int]:
    "`n` consecutive free ports of this file's range (the proxy, its API, the hub's API, the service, the gateway)."
    def free(p):
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", p)); return True
            except OSError: return False
    for base in range(lo, hi - n + 1):
        if all(free(p) for p in range(base, base + n)): return list(range(base, base + n))
    raise RuntimeError(f"no {n} free ports in {lo}-{hi - 1}")


def ports_lock():
    """Held from choosing ports until the hub listens on them: test processes running side by side (xdist) never pick
    the same."""
    import fcntl
    f = open(Path(os.environ.get("TMPDIR", "/tmp")) / "hedgerl-test-service-ports.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


BASE_CONFIG = '''
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
    c.Authenticator.allowed_users = {%(ann)r, %(bob)r}
    c.JupyterHub.services.append({"name": "hc-admin", "api_token": %(admin_token)r, "display": False})
    c.JupyterHub.load_roles.append({"name": "admin", "services": ["hc-admin"]})
'''


class Hub:
    """A real JupyterHub + proxy: from a config folder with the base above and the service's file, or from `config`
    (the platform's)."""
    def __init__(self, tmp: Path, config: Path | None = None):
        self.tmp = tmp
        self.lock = ports_lock()  # released once the hub runs (start) or by stop
        self.port, _, self.api_port, self.service_port, self.gateway_port = free_ports(5)
        self.url = f"http://127.0.0.1:{self.port}"
        if config is None:
            conf = tmp / "jupyterhub_config.d"; conf.mkdir()
            (conf / "00-test-base.py").write_text(BASE_CONFIG % dict(chp=str(CHP), password=PASSWORD, ann=ANN, bob=BOB,
                                                                     admin_token=ADMIN_TOKEN))
            (conf / "30-service.py").write_text((ROOT / "hub" / "jupyterhub_config.d" / "30-service.py").read_text())
            config = tmp / "jupyterhub_config.py"
            config.write_text("from pathlib import Path\nfrom hedgerl.platform import PlatformContext, "
                              "load_config_dir\n"
                              "load_config_dir(get_config(), Path(__file__).parent / 'jupyterhub_config.d', "
                              "PlatformContext())\n")
        self.config = config
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "HEDGERL_DATA_FOLDER": str(tmp / "data"),
                    "HEDGERL_HUB_PORT": str(self.port), "HEDGERL_SERVICE_PORT": str(self.service_port),
                    "HEDGERL_GATEWAY_PORT": str(self.gateway_port)}
        self.log = tmp / "hub.log"
        self.proc = None

    def start(self, timeout: float = 90, service_status: int = 200) -> dict:
        """Start the hub; seconds until /hub/health answers and until the service's health answers `service_status`
        through the proxy."""
        try: return self._start(timeout, service_status)
        finally: self.lock.close()

    def _start(self, timeout, service_status):
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(self.config)], cwd=self.tmp,
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        times = {}
        for name, path, status in (("hub", "/hub/health", 200), ("service", f"{PREFIX}api/v1/health", service_status)):
            while True:
                if self.proc.poll() is not None: raise AssertionError(f"jupyterhub exited "
                                                                      f"{self.proc.returncode}:\n{self.text()[-4000:]}")
                try:
                    if requests.get(self.url + path, timeout=2).status_code == status: break
                except requests.ConnectionError: pass
                if time.monotonic() - t0 > timeout: raise AssertionError(
                        f"{path} not up in {timeout} s:\n{self.text()[-4000:]}")
                time.sleep(0.1)
            times[name] = round(time.monotonic() - t0, 2)
        while "JupyterHub is now running" not in self.text():  # every service started, every port taken
            if time.monotonic() - t0 > timeout: raise AssertionError(f"the hub did not finish starting in {timeout} "
                                                                     f"s:\n{self.text()[-4000:]}")
            time.sleep(0.1)
        return times

    def text(self) -> str: return self.log.read_text(errors="replace")

    def stop(self):
        """Stop the hub (SIGTERM: it stops its proxy and services); then end whatever still listens on its ports, noted
        in `left`."""
        self.lock.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try: self.proc.wait(30)
            except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()
        # The ports were free when chosen (under the lock), so a listener now is this hub's: a hub that exits while it
        # starts (a service that failed) leaves its proxy and services running.
        self.left = {p: pid for p in (self.port, self.port + 1, self.api_port, self.service_port,
                                      self.gateway_port) if (pid := listener(p))}
        for pid in set(self.left.values()):
            try: os.kill(pid, signal.SIGTERM)
            except ProcessLookupError: pass
        t0 = time.monotonic()
        while any(listener(p) for p in self.left) and time.monotonic() - t0 < 10: time.sleep(0.2)

    def check_nothing_left(self):
        assert not self.left, f"still listening after the hub stopped (now ended): {self.left}"

    def api(self, method: str, path: str, headers: dict | None = None, **kw) -> requests.Response:
        "The hub's REST API (as the test's admin service unless `headers` say otherwise)."
        return requests.request(method, f"{self.url}/hub/api{path}",
                                headers=headers or {"Authorization": f"token {ADMIN_TOKEN}"}, timeout=10, **kw)

    def token(self, user: str) -> str:
        r = self.api("POST", f"/users/{user}/tokens", json={"note": "test_service"})
        assert r.status_code == 201, r.text
        return r.json()["token"]


def service_config_file():
    import importlib.util
    spec = importlib.util.spec_from_file_location("hedgerl_test_30_service",
                                                  ROOT / "hub" / "jupyterhub_config.d" / "30-service.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m


@pytest.mark.parametrize("deployment", ["local", "kubernetes"])
def test_service_file_on_a_bare_config(tmp_path, deployment):
    """30-service.py on a bare Config beside another file's service and role: the service sees the hub's settings, `$`
    and all."""
    from traitlets.config import Config
    from hedgerl.core import load_settings
    from hedgerl.platform import PlatformContext
    env = {"HEDGERL_DATA_FOLDER": str(
            tmp_path / "d$$x"), "HEDGERL_REGISTRY_URL": "postgresql+psycopg://svc:p$$w@db/hedgerl",  # $$: a literal $
           "HEDGERL_HUB_DB_URL": "postgresql+psycopg://hub:hub-secret@db/hub", "HEDGERL_SERVICE_PORT": "18299",
           "HEDGERL_HUB_DEPLOYMENT": deployment}
    ctx = PlatformContext(settings=load_settings("", environ=env), root=ROOT, state=tmp_path / "state", bin=BIN)
    c = Config()
    c.JupyterHub.services.append({"name": "idle-culler"}); c.JupyterHub.load_roles.append({"name": "idle-culler",
            "services": ["idle-culler"]})
    service_config_file().configure(c, ctx)
    services, roles = c.JupyterHub.services.get_value([]), c.JupyterHub.load_roles.get_value([])
    assert [s["name"] for s in services] == ["idle-culler", "hedgerl"] and [r["name"] for r in roles] == ["idle-culler",
            "hedgerl-service-users"]
    svc = services[1]
    assert svc["url"] == ("http://hub:18299" if deployment == "kubernetes" else "http://127.0.0.1:18299")
    assert svc["command"] == [str(BIN / "python"), "-m", "hedgerl.service"] and svc["oauth_no_confirm"] is True
    assert roles[1] == {"name": "hedgerl-service-users", "description": roles[1]["description"],
                        "scopes": ["access:services!service=hedgerl"], "groups": ["researchers"]}
    seen = load_settings("", environ=svc["environment"])  # what the service reads
    assert "hub-secret" not in json.dumps(svc["environment"])  # the hub's database is none of its business
    mine, hubs = seen.as_dict(), ctx.settings.as_dict()
    for d in (mine, hubs): d["hub"].pop("db_url"); d["hub"].pop("state")
    if deployment == "kubernetes": assert mine["service"].pop("host") == "0.0.0.0"; hubs["service"].pop("host")
    assert (mine == hubs and seen.registry.url == "postgresql+psycopg://svc:p$w@db/hedgerl"
            and seen.hub.state == tmp_path / "state")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    h = Hub(tmp_path_factory.mktemp("hub"))
    try:
        h.start_times = h.start()
        print(f"\nhub start with the hedgerl service: /hub/health after {h.start_times['hub']} s, "
              f"the service through the proxy after {h.start_times['service']} s")
        # the role created the group at start; approved users are put in it (here by the admin's API)
        h.group_at_start = h.api("GET", "/groups/researchers").status_code
        assert h.api("POST", "/groups/researchers/users", json={"users": [ANN]}).status_code == 200
        h.tokens = {ANN: h.token(ANN), BOB: h.token(BOB)}
        yield h
    finally:
        h.stop()
    h.check_nothing_left()


def service(hub, path: str, token: str | None = None, scheme: str = "token", **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    if token: headers["Authorization"] = f"{scheme} {token}"
    return requests.get(f"{hub.url}{PREFIX}{path}", headers=headers, timeout=10, **kw)


def test_health_is_public(hub):
    r = service(hub, "api/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and set(r.json()) == {"status", "version"}


def test_me_with_a_researchers_token(hub):
    for scheme in ("token", "Bearer"):
        r = service(hub, "api/v1/me", hub.tokens[ANN], scheme)
        assert r.status_code == 200, r.text
        assert r.json() == {"name": ANN, "groups": ["researchers"], "admin": False}


def test_anonymous_is_401_json(hub):
    for path in ("api/v1/me", "api/v1/nothing-here", ""):
        r = service(hub, path)
        assert r.status_code == 401 and r.headers["content-type"] == "application/json", (path, r.text)
        assert r.json()["detail"].startswith("authentication required")
    r = service(hub, "api/v1/me", "not-a-token")
    assert r.status_code == 401 and "does not know this token" in r.json()["detail"]


def test_without_the_role_is_403_json(hub):
    r = service(hub, "api/v1/me", hub.tokens[BOB])
    assert r.status_code == 403 and r.headers["content-type"] == "application/json"
    assert f"user '{BOB}' may not use the hedgerl service" in r.json()["detail"]
    assert service(hub, "api/v1/nothing-here", hub.tokens[BOB]).status_code == 403


def test_unknown_route_is_404_json_for_a_researcher(hub):
    r = service(hub, "api/v1/nothing-here", hub.tokens[ANN])
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_group_role_and_service_scopes(hub):
    assert hub.group_at_start == 200  # JupyterHub created `researchers` from the role that names it
    assert "hedgerl-service-users" in hub.api("GET", "/groups/researchers").json()["roles"]
    scopes = lambda user: set(hub.api("GET", "/user", headers={"Authorization": f"token {hub.tokens[user]}"}).json()[
            "scopes"])
    assert "access:services!service=hedgerl" in scopes(ANN) and not any(s.startswith("access:services")
                                                                        for s in scopes(BOB))
    svc = hub.api("GET", "/services/hedgerl").json()
    assert svc["roles"] == [] and svc["prefix"] == PREFIX  # the service holds no scope beyond identifying callers


def test_docs_through_the_proxy(hub):
    page = service(hub, "api/v1/docs")
    assert page.status_code == 200 and f"{PREFIX}api/v1/openapi.json" in page.text and "cdn." not in page.text
    spec = service(hub, "api/v1/openapi.json").json()
    assert {f"{PREFIX}api/v1/health", f"{PREFIX}api/v1/me"} <= set(spec["paths"])


def test_metrics_need_read_metrics(hub):
    assert service(hub, "api/v1/me", hub.tokens[ANN]).status_code == 200
    r = service(hub, "metrics", ADMIN_TOKEN)  # the admin role holds read:metrics
    assert r.status_code == 200 and 'route="/api/v1/me",status="200"' in r.text
    assert service(hub, "metrics", hub.tokens[ANN]).status_code == 403 and service(hub, "metrics").status_code == 401


def browser_login(hub, user: str, password: str = PASSWORD) -> tuple[requests.Session, requests.Response]:
    "A browser's visit to the service's `me` page: through the hub's OAuth redirect, its real login form, and back."
    s = requests.Session()
    s.headers["Accept"] = "text/html,application/xhtml+xml,*/*;q=0.8"
    first = s.get(f"{hub.url}{PREFIX}api/v1/me", allow_redirects=False, timeout=10)
    assert first.status_code == 302, first.text
    q = dict(re.findall(r"[?&]([^=&]+)=([^&]*)", first.headers["location"]))
    assert first.headers["location"].startswith("/hub/api/oauth2/authorize?") and q["state"] and q[
            "code_challenge_method"] == "S256"
    form = s.get(hub.url + first.headers["location"], timeout=10)  # not logged in to the hub: its login form
    assert urlpath(form.url) == "/hub/login" and 'name="password"' in form.text, form.url
    xsrf = s.cookies.get("_xsrf", path="/hub/") or s.cookies.get("_xsrf")
    done = s.post(form.url, data={"username": user, "password": password, "_xsrf": xsrf}, timeout=10)
    return s, done


def listener(port: int) -> int | None:
    "The pid of the process listening on 127.0.0.1:`port`."
    import psutil
    return next((c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == port), None)


def urlpath(url: str) -> str: return requests.utils.urlparse(url).path


def test_browser_login_through_the_hub(hub):
    s, r = browser_login(hub, ANN)
    assert r.status_code == 200 and urlpath(r.url) == f"{PREFIX}api/v1/me", (r.url, r.text[:300])
    assert r.json() == {"name": ANN, "groups": ["researchers"], "admin": False}
    assert [h.status_code for h in r.history][-2:] == [302, 302]  # authorize (no consent page) -> oauth_callback -> me
    assert any(c.name == "service-hedgerl" and c.path == PREFIX and c.has_nonstandard_attr("HttpOnly")
               for c in s.cookies)
    assert s.get(f"{hub.url}{PREFIX}api/v1/me", timeout=10).json()["name"] == ANN  # the cookie alone, no new login
    # a script's fetch (as from another user's page on the same origin) does not get in with the cookie
    r = s.get(f"{hub.url}{PREFIX}api/v1/me", headers={"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"},
              timeout=10)
    assert r.status_code == 401
    # no login code in the hub's log line
    assert "code=" not in hub.text().split("oauth_callback", 1)[-1].split("\n", 1)[0]


def test_browser_of_a_user_without_the_role(hub):
    s, r = browser_login(hub, BOB)
    assert r.status_code == 403, (r.url, r.status_code)  # the hub's authorize step refuses: no access scope
    assert not any(c.name == "service-hedgerl" for c in s.cookies)


def test_service_log_has_no_secrets(hub):
    log = hub.text()
    for secret in (PASSWORD, ADMIN_TOKEN, *hub.tokens.values(),
                   *(p.read_text() for p in (hub.tmp / "data" / "hub" / "secrets").iterdir())):
        assert secret not in log
    assert "hedgerl service 0.0.1 on http://127.0.0.1" in log  # the service's own log goes to the hub's


@pytest.mark.slow
def test_the_hub_restarts_a_dead_service(hub):
    "A crashed service comes back (the hub restarts managed services); the browser's login survives it."
    s, r = browser_login(hub, ANN)
    assert r.status_code == 200
    pid = listener(hub.service_port)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            if service(hub, "api/v1/health").status_code == 200: break
        except requests.ConnectionError: pass
        time.sleep(0.2)
    assert service(hub, "api/v1/health").status_code == 200
    # the cookie's secret is the platform's
    assert s.get(f"{hub.url}{PREFIX}api/v1/me", timeout=10).json()["name"] == ANN


@pytest.mark.slow
def test_with_the_platforms_hub_config(tmp_path):
    """The same through hub/jupyterhub_config.py (NativeAuthenticator, the gateway, the culler, ...): a user signs up,
the admin approves them, their token gets in; a token of theirs without the service's scope does not; a browser logs
in through the real form; in Chromium (where installed) Swagger UI renders with every request staying on this
machine."""
    from hedgerl.core import load_settings
    from hedgerl.platform import HubClient, PlatformContext, admin_credentials
    hub = Hub(tmp_path, config=ROOT / "hub" / "jupyterhub_config.py")
    admin, admin_pw, _ = admin_credentials(PlatformContext(settings=load_settings(environ=hub.env)))
    try:
        times = hub.start(timeout=120)
        print(f"\nplatform hub (hub/jupyterhub_config.py) start: /hub/health after {times['hub']} s, the service after "
              f"{times['service']} s")
        hc, pw = HubClient(hub.url), "Pw-" + os.urandom(9).hex()
        assert hc.signup(ANN, pw).status_code in (200, 302)
        with pytest.raises(PermissionError): hc.login(ANN, pw)  # not approved yet
        a = hc.login(admin, admin_pw)
        assert a.get(f"{hub.url}/hub/authorize/{ANN}", allow_redirects=False).status_code == 302  # approve
        s = hc.login(ANN, pw)
        r = service(hub, "api/v1/me", hc.token(s, ANN))
        assert r.status_code == 200 and r.json() == {"name": ANN, "groups": ["researchers"], "admin": False}, r.text
        # her token without the service's scope
        r = service(hub, "api/v1/me", hc.token(s, ANN, scopes=["read:users:name!user"]))
        assert r.status_code == 403 and r.headers["content-type"] == "application/json", r.text
        assert service(hub, "api/v1/me").status_code == 401
        me = service(hub, "api/v1/me", hc.token(a, admin)).json()
        assert me["name"] == admin and me["admin"] is True
        _, r = browser_login(hub, ANN, pw)
        assert r.status_code == 200 and r.json()["name"] == ANN, (r.url, r.text[:300])
        # 70-metrics.py's scraper
        scraper = (tmp_path / "data" / "hub" / "secrets" / "prometheus_token").read_text().strip()
        r = service(hub, "metrics", scraper)
        assert r.status_code == 200 and "hedgerl_service_requests_total" in r.text, r.text[:300]
        if Path("/usr/bin/chromium").exists(): chromium_checks(hub, ANN, pw)
    finally:
        hub.stop()
    hub.check_nothing_left()


def chromium_checks(hub, user: str, password: str):
    """Chromium (headless): the login through the hub ends on the service's JSON; /docs renders Swagger UI; nothing
    leaves 127.0.0.1."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:",
                                                                   "blob:")) else outside.append(r.url))
            page.goto(f"{hub.url}{PREFIX}api/v1/me")
            page.fill("input[name=username]", user); page.fill("input[name=password]", password)
            page.click("input[type=submit], button[type=submit]")
            page.wait_for_url(f"**{PREFIX}api/v1/me", timeout=20_000)
            assert json.loads(page.inner_text("body"))["name"] == user
            page.goto(f"{hub.url}{PREFIX}api/v1/docs")
            # Swagger UI rendered the schema
            page.get_by_text(f"{PREFIX}api/v1/me", exact=True).first.wait_for(timeout=20_000)
            assert page.locator(".swagger-ui .info .title").inner_text().startswith("hedgerl service")
        finally:
            browser.close()
    assert not outside, f"requests left this machine: {outside}"


@pytest.mark.slow
def test_a_service_that_cannot_start_leaves_the_hub_serving(tmp_path):
    "A bad registry setting for the service: the hub runs on, the service answers 503 naming the problem, its log too."
    hub = Hub(tmp_path)
    hub.env["HEDGERL_REGISTRY_URL"] = f"http://127.0.0.1:{hub.service_port}{PREFIX}"  # the service as its own database
    try:
        hub.start(service_status=503)
        assert requests.get(f"{hub.url}/hub/health", timeout=5).status_code == 200
        r = service(hub, "api/v1/health")
        assert (r.status_code == 503 and r.json()["status"] == "error"
                and "(SettingsError)" in r.json()["detail"]), r.text
        # the reason is the log's, not the public's (a setting may hold a password)
        assert "[registry] url" not in r.text
        assert service(hub, "api/v1/me", "any").status_code == 503
        assert "the hedgerl service could not start, serving 503s" in hub.text() and "[registry] url" in hub.text()
    finally:
        hub.stop()
    hub.check_nothing_left()
