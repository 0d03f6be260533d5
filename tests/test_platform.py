"""The platform end to end, started the way `make up` starts it (`hedgerl hub up`), with the real proxy, hub, gateway
and hedgerl service on loopback in a temporary data folder: sign-up and approval through the real forms, two users'
workspaces, Dask through the gateway from a kernel, a training run recorded through the service, what user B must not
reach of user A's, a restart that keeps everything, and a stop that leaves no process behind."""
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests

from hedgerl.platform import HubClient
from platform_tools import BIN, ROOT, Kernel, Up, platform_env, platform_processes

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="the platform's isolation tests need root (workspaces run as the users' own "
                                "accounts)")


def _userdel(*names):
    for n in names: subprocess.run(["userdel", "-r", n], capture_output=True)


def test_make_up_refuses_a_taken_port_in_one_line(tmp_path):
    env = platform_env(tmp_path / "data")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(env["HEDGERL_GATEWAY_PORT"]))); s.listen()
        p = subprocess.run([str(BIN / "hedgerl"), "hub", "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "[gateway] port: cannot listen on" in p.stderr, p.stderr


def test_bad_setting_is_one_line(tmp_path):
    env = {**platform_env(tmp_path / "data"), "HEDGERL_HUB_DEPLOYMENT": "mesos"}
    p = subprocess.run([str(BIN / "hedgerl"), "hub", "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert (p.returncode == 2 and p.stderr.count("\n") == 1 and "deployment" in p.stderr
            and "mesos" in p.stderr), p.stderr


def test_platform_end_to_end(tmp_path):
    data = tmp_path / "data"
    env = platform_env(data)
    a, b = f"ta{secrets.token_hex(3)}", f"tb{secrets.token_hex(3)}"
    pw_a, pw_b = "alpha-" + secrets.token_hex(6), "bravo-" + secrets.token_hex(6)
    up = Up(env)
    timings = {}
    try:
        timings["up_to_healthy_s"] = up.wait()
        url, hub = up.url, HubClient(up.url)
        m = re.search(r"first login: user '(\w+)', password '([^']+)'", up.text())
        assert m, up.text()
        admin_name, admin_pw = m.groups()
        creds = data / "hub" / "admin-credentials"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600 and admin_pw in creds.read_text()
        assert admin_pw not in (data / "hub" / "hub.log").read_text()
        for f in (data / "hub" / "secrets").iterdir(): assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

        # sign-up, approval, login through the real forms
        for n, p in ((a, pw_a), (b, pw_b)): assert hub.signup(n, p).status_code in (200, 302)
        assert "already in use" in hub.signup(a, "another-password-1").text  # a duplicate sign-up is refused
        with pytest.raises(PermissionError): hub.login(a, pw_a)  # not approved yet
        admin = hub.login(admin_name, admin_pw)
        for n in (a, b): assert admin.get(f"{url}/hub/authorize/{n}").status_code == 200
        with pytest.raises(PermissionError): hub.login(a, "wrong-password-0")
        sa, sb = hub.login(a, pw_a), hub.login(b, pw_b)
        ta, tb = hub.token(sa, a), hub.token(sb, b)

        # workspaces: each user reaches their own JupyterLab, not the other's
        timings["spawn_s"] = hub.spawn(a, ta)
        hub.spawn(b, tb)
        r = sa.get(f"{url}/user/{a}/lab")
        assert r.status_code == 200 and "JupyterLab" in r.text, r.status_code
        assert sb.get(f"{url}/user/{a}/lab").status_code == 403

        ka, kb = Kernel(url, a, ta), Kernel(url, b, tb)
        try:
            assert ka.run("import os, pwd; print(pwd.getpwuid(os.getuid()).pw_name, "
                          "oct(os.stat(os.path.expanduser('~')).st_mode & 0o777))").split() == [a, "0o700"]
            ka.run("open(os.path.expanduser('~/hello.txt'), 'w').write('kept')")
            assert kb.run(f"import os\ntry: os.listdir('/home/{a}'); print('read')\nexcept PermissionError: "
                          f"print('refused')").strip() == "refused"

            # Dask through the gateway, from A's kernel: 2 workers, a 200,000-path backtest equal bit for bit to the
            # serial one
            out = ka.run(
                "import time, numpy as np\n"
                "from hedgerl.backtest import backtest, dask_client\n"
                "from hedgerl.baselines import make_baseline\n"
                "t0 = time.monotonic(); client = dask_client(n_workers=2); client.wait_for_workers(2, timeout=120); dt "
                "= time.monotonic() - t0\n"
                "strat = make_baseline('delta')\n"
                "par = backtest(strat, 'cao2021-gbm-1m-1d', n_paths=200_000, seed=11, client=client, progress=False)\n"
                "ser = backtest(strat, 'cao2021-gbm-1m-1d', n_paths=200_000, seed=11, progress=False)\n"
                "print(type(client.cluster).__module__, client.cluster.name, np.array_equal(par.pnl, ser.pnl), "
                "round(dt, 1))", timeout=400)
            module, cluster_name, equal, t_cluster = out.split()
            assert module.startswith("dask_gateway") and equal == "True", out
            timings["gateway_cluster_2_workers_s"] = float(t_cluster)
            # B neither lists nor reaches A's cluster
            out = kb.run("from dask_gateway import Gateway\ng = Gateway()\nprint([c.name for c in g.list_clusters()])\n"
                         f"try: g.connect('{cluster_name}'); print('connected')\nexcept Exception as e: "
                         f"print('refused', type(e).__name__)")
            assert cluster_name not in out.splitlines()[0] and "refused" in out.splitlines()[1], out

            # a small training run recorded in the registry through the service, private to A
            out = ka.run("from hedgerl.runs import train\n"
                         "r = train('ntb', 'cao2021-gbm-1m-1d', 1, params={'n_paths': 500}, test_paths=500, "
                         "valid_paths=200)\n"
                         "print(r['run_id'], r['status'])", timeout=400)
            run_id, status = out.split()
            assert status == "finished", out
            out = kb.run("from hedgerl.registry import open_registry\nreg = open_registry()\n"
                         f"print({int(run_id)} in set(reg.runs().id))\n"
                         f"try: reg.run({int(run_id)}).finish(); print('changed')\nexcept Exception as e: "
                         f"print('refused', type(e).__name__)")
            assert out.splitlines()[0] == "False" and out.splitlines()[1].startswith("refused"), out
        finally:
            ka.close(); kb.close()

        # the service: A's token 200, none 401, a token without the role 403; health needs no login
        svc = f"{url}/services/hedgerl/api/v1"
        assert requests.get(f"{svc}/health").json()["status"] == "ok"
        me = requests.get(f"{svc}/me", headers={"Authorization": f"token {ta}"})
        assert me.status_code == 200 and me.json()["name"] == a and me.json()["admin"] is False, me.text
        r = requests.get(f"{svc}/me")
        assert r.status_code == 401 and "detail" in r.json()
        narrow = hub.token(sa, a, scopes=[f"read:users:name!user={a}"])
        r = requests.get(f"{svc}/me", headers={"Authorization": f"token {narrow}"})
        assert r.status_code == 403 and "detail" in r.json(), r.text
        assert requests.get(f"{url}/hub/metrics").status_code in (401, 403)

        # stop (Ctrl-C) and nothing is left; start again and everything is still there
        assert up.stop(signal.SIGINT) == 0, up.text()
        time.sleep(1)
        assert platform_processes(env) == []
        up = Up(env)
        timings["restart_to_healthy_s"] = up.wait()
        assert "first login" not in up.text()  # the admin's password is not made (nor printed) again
        hub.login(a, pw_a); hub.login(b, pw_b)
        assert requests.get(f"{url}/hub/api/user", headers={"Authorization": f"token {ta}"}).json()["name"] == a
        assert (Path(f"/home/{a}") / "hello.txt").read_text() == "kept"
        runs = requests.get(f"{svc}/registry/runs", headers={"Authorization": f"token {ta}"})
        assert runs.status_code == 200 and int(run_id) in [r["id"] for r in runs.json()["rows"]], runs.text
        models = requests.get(f"{svc}/registry/models", headers={"Authorization": f"token {ta}"}).json()["rows"]
        model = next(m for m in models if m["run_id"] == int(run_id))
        f = requests.get(f"{svc}/registry/models/{model['id']}/file", headers={"Authorization": f"token {ta}"})
        assert f.status_code == 200 and f.content[:2] == b"PK"  # the model file, served to its owner
        assert requests.get(f"{svc}/registry/models/{model['id']}/file",
                            headers={"Authorization": f"token {tb}"}).status_code == 404

        # `hedgerl hub down` from another terminal stops it, leaving nothing behind
        down = subprocess.run([str(BIN / "hedgerl"), "hub", "down"], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        assert up.proc.wait(30) == 0
        time.sleep(1)
        assert platform_processes(env) == []
        print(json.dumps(timings))
        (data / "timings.json").write_text(json.dumps(timings))
    finally:
        up.stop(signal.SIGTERM)
        _userdel(a, b)


def test_a_new_user_in_the_browser(tmp_path):
    """Chromium, as a new user and the admin would: sign up on the form, the admin logs in and clicks Authorize, the
user logs in and lands in JupyterLab with the hedgerl kernel and TensorBoard in the launcher; no request leaves
127.0.0.1."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not Path("/usr/bin/chromium").exists():
        if os.environ.get("CI") == "true": pytest.fail("/usr/bin/chromium is missing (make services installs it)")
        pytest.skip("/usr/bin/chromium is missing")
    env = platform_env(tmp_path / "data")
    name, pw = f"tc{secrets.token_hex(3)}", "charlie-" + secrets.token_hex(6)
    up = Up(env)
    try:
        up.wait()
        url = up.url
        admin_name, admin_pw = re.search(r"first login: user '(\w+)', password '([^']+)'", up.text()).groups()
        hosts = set()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                              "--disable-component-update"])
            def page():
                pg = browser.new_context().new_page()
                pg.on("request", lambda r: hosts.add(r.url.split("/")[2] if "://" in r.url else r.url))
                return pg
            def log_in(pg, n, password):
                pg.goto(f"{url}/hub/login")
                pg.fill("input[name=username]", n); pg.fill("input[name=password]", password)
                pg.click("#login_submit")
            user = page()
            user.goto(f"{url}/hub/signup")
            user.fill("input[name=username]", name); user.fill("input[name=signup_password]", pw)
            user.fill("input[name=signup_password_confirmation]", pw)
            user.click("#signup_submit")
            user.wait_for_load_state()
            assert "sent to the admin" in user.content() or "authoriz" in user.content().lower(), user.content()[-2000:]
            admin = page()
            log_in(admin, admin_name, admin_pw)
            admin.goto(f"{url}/hub/authorize")
            admin.click(f"a[href$='authorize/{name}']")
            admin.wait_for_load_state()
            log_in(user, name, pw)
            user.wait_for_url(re.compile(rf".*/user/{name}/lab.*"), timeout=120_000)
            user.wait_for_selector(".jp-Launcher", timeout=120_000)
            launcher = user.inner_text(".jp-Launcher")
            assert "hedgerl" in launcher and "TensorBoard" in launcher, launcher
            browser.close()
        assert hosts and all(h.split(":")[0] == "127.0.0.1" for h in hosts), hosts
    finally:
        up.stop(signal.SIGTERM)
        _userdel(name)


def test_kill_9_of_make_up_leaves_nothing_and_a_second_up_is_refused(tmp_path):
    """A second `hub up` on the same state is one line; kill -9 of `hub up` takes the hub and everything it started
    with it; up again works."""
    env = platform_env(tmp_path / "data")
    up = Up(env, "--no-reference")
    try:
        up.wait()
        again = subprocess.run([str(BIN / "hedgerl"), "hub", "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
        assert (again.returncode == 2 and "already running" in again.stderr
                and again.stderr.count("\n") == 1), again.stderr
        up.proc.kill(); up.proc.wait()
        deadline = time.time() + 60
        while platform_processes(env) and time.time() < deadline: time.sleep(0.5)
        assert platform_processes(env) == []
        up = Up(env, "--no-reference")  # the stale pid file does not stop a new start
        up.wait()
        assert requests.get(f"{up.url}/hub/health").status_code == 200
    finally:
        up.stop(signal.SIGTERM)


def test_a_gateway_that_cannot_start_leaves_the_hub_serving(tmp_path):
    """The dask-gateway's database is not a database: `hub up` names the gateway, and the hub, its login and the
    hedgerl service serve on."""
    env = platform_env(tmp_path / "data")
    (tmp_path / "data" / "hub").mkdir(parents=True, mode=0o700)
    # sqlite cannot open a folder: the gateway exits at start
    (tmp_path / "data" / "hub" / "dask-gateway.sqlite").mkdir()
    up = Up(env, "--no-reference")
    try:
        up.wait(timeout=180)
        assert "warning: the dask-gateway does not answer" in up.text(), up.text()
        assert requests.get(f"{up.url}/hub/health").status_code == 200
        assert requests.get(f"{up.url}/services/hedgerl/api/v1/health").json()["status"] == "ok"
        admin_name, admin_pw = re.search(r"first login: user '(\w+)', password '([^']+)'", up.text()).groups()
        HubClient(up.url).login(admin_name, admin_pw)
    finally:
        up.stop(signal.SIGTERM)


def test_a_hub_killed_under_make_up_takes_nothing_with_it(tmp_path):
    """kill -9 of the hub itself (not of `hub up`): `hub up` says the hub exited and ends the proxy and services the
    hub left behind."""
    env = platform_env(tmp_path / "data")
    up = Up(env, "--no-reference")
    try:
        up.wait()
        hub_pid = int((tmp_path / "data" / "hub" / "jupyterhub.pid").read_text())
        os.kill(hub_pid, signal.SIGKILL)
        assert up.proc.wait(60) != 0
        assert "the hub exited with status -9" in up.text(), up.text()
        time.sleep(0.5)
        assert platform_processes(env) == []
    finally:
        up.stop(signal.SIGTERM)


def test_ctrl_c_stops_make_up_even_when_started_ignoring_sigint(tmp_path):
    """`hedgerl hub up &` from a script starts with SIGINT ignored (bash does that to background jobs): Ctrl-C still
    stops it, and everything."""
    env = platform_env(tmp_path / "data")
    up = Up(env, "--no-reference", sigint=signal.SIG_IGN)
    try:
        up.wait()
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0 and "stopping the platform" in up.text(), up.text()
        time.sleep(0.5)
        assert platform_processes(env) == []
    finally:
        up.stop(signal.SIGTERM)
