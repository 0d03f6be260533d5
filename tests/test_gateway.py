"""The dask-gateway through a real JupyterHub (hub/jupyterhub_config.py, its proxy and its services) on loopback ports
of 18100-18199, in a temporary state folder. Approved hub users with API tokens act as workspaces do: a subprocess as
the user's own system account with the variables the hub gives a workspace, calling `hedgerl.backtest.dask_client`.

Default: the gateway serves as a hub service and refuses anonymous callers, users outside `researchers`, users with no
system account, and more workers than its limit (each with a reason). Slow (`-m slow`): in the environment of A's real
workspace (spawned by the hub), A's 2-worker cluster runs as A, a 200,000-path backtest on it equals the serial one bit
for bit, its dashboard answers through the hub's proxy; user B can neither list nor reach A's cluster; an idle cluster
goes after [gateway] idle_timeout; stopping the hub stops the gateway and its clusters.
As root the test creates system accounts `hb<hex>` (group `hedgerl`, as the hub's spawner does) and deletes them."""
import base64
import contextlib
import grp
import importlib.util
import json
import os
import pwd
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hedgerl.core import load_settings
from hedgerl.platform import PlatformContext, set_hub_password

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PORTS = range(18100, 18200)  # this test's range (other platform tests use theirs)
IDLE = 30  # [gateway] idle_timeout of the test hub, seconds
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the local gateway runs clusters as users' own accounts: "
                                "needs root")


def free_ports(n: int, start: int) -> list[int]:
    "`n` consecutive free ports of PORTS from `start`, as a list."
    for base in range(start, PORTS.stop - n + 1):
        try:
            for p in range(base, base + n):
                with socket.socket() as s: s.bind(("127.0.0.1", p))
            return list(range(base, base + n))
        except OSError: continue
    raise RuntimeError(f"no {n} free consecutive ports in {PORTS.start}-{PORTS.stop - 1}")


def http(method: str, url: str, token: str | None = None, scheme: str = "token", body=None, timeout=30):
    "(status, parsed JSON or text) of a request; `scheme` is the Authorization type (the gateway wants `jupyterhub`)."
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    if token: req.add_header("Authorization", f"{scheme} {token}")
    if body is not None: req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: status, data = r.status, r.read()
    except urllib.error.HTTPError as e: status, data = e.code, e.read()
    try: return status, json.loads(data or b"null")
    except ValueError: return status, data.decode(errors="replace")


def wait_for(what: str, check, timeout: float, every: float = 0.25):
    "Poll `check()` until truthy (return it) or fail after `timeout` seconds."
    t0 = time.monotonic()
    while True:
        v = check()
        if v: return v
        if time.monotonic() - t0 > timeout: raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


def processes_of(user: str) -> list[str]:
    p = subprocess.run(["ps", "-u", user, "-o", "pid=,stat=,args="], capture_output=True, text=True)
    return [l for l in p.stdout.splitlines() if l.split()[1:2] != ["Z"]]  # zombies wait for init, they run nothing


def make_account(name: str) -> None:
    """A platform account as hub/jupyterhub_config.d/20-spawner.local.py makes one: own group, in group hedgerl, home
    0700."""
    try: grp.getgrnam("hedgerl")
    # left in place: the platform's group
    except KeyError: subprocess.run(["groupadd", "--system", "hedgerl"], check=True)
    subprocess.run(["useradd", "--create-home", "--user-group", "--groups", "hedgerl", "--shell", "/bin/bash", name],
                   check=True)
    os.chmod(pwd.getpwnam(name).pw_dir, 0o700)


def delete_account(name: str) -> None:
    for line in processes_of(name):  # nothing of the test may outlive it
        with contextlib.suppress(ProcessLookupError): os.kill(int(line.split()[0]), signal.SIGKILL)
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        subprocess.run(["userdel", "-r", name], capture_output=True)


def default_sigint() -> None:
    """SIGINT as in a terminal: a test run in the background inherits it ignored, and the hub's services that count on
    the"""
    "default (the idle culler) would then wait for their SIGTERM when the hub stops them."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Hub:
    """The platform's hub from hub/jupyterhub_config.py (plus an admin service for the test), its gateway among its
    services."""
    def __init__(self, tmp: Path):
        self.tmp, self.proc = tmp, None
        self.port, _, _ = free_ports(3, PORTS.start)  # proxy, its API (+1), the hub's API (+2)
        self.gateway_port, = free_ports(1, self.port + 3)
        self.service_port, = free_ports(1, self.gateway_port + 1)
        self.admin_token = secrets.token_hex(16)
        self.env = {"HEDGERL_DATA_FOLDER": str(tmp / "data"), "HEDGERL_HUB_STATE": str(tmp / "state"),
                    "HEDGERL_HUB_PORT": str(self.port), "HEDGERL_GATEWAY_PORT": str(self.gateway_port),
                    "HEDGERL_SERVICE_PORT": str(self.service_port), "HEDGERL_GATEWAY_IDLE_TIMEOUT": str(IDLE),
                    "HEDGERL_HUB_DEPLOYMENT": "local"}
        self.ctx = PlatformContext(settings=load_settings(environ=self.env), bin=BIN)
        self.url = f"http://127.0.0.1:{self.port}"
        self.gateway = f"{self.url}/services/dask-gateway"
        self.log = tmp / "hub.out"

    def start(self) -> float:
        "Start the hub; seconds until the gateway answers through the hub's proxy."
        config = self.tmp / "jupyterhub_config.py"
        config.write_text(f"""c = get_config()
load_subconfig({str(ROOT / 'hub' / 'jupyterhub_config.py')!r})
import os
c.JupyterHub.services.append({{"name": "hb-test-admin", "api_token": os.environ["HB_TEST_ADMIN_TOKEN"]}})
c.JupyterHub.load_roles.append({{"name": "hb-test-admin", "services": ["hb-test-admin"],
                                 "scopes": ["admin:users", "admin:servers", "tokens", "read:groups"]}})
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HEDGERL_", "JUPYTERHUB_", "DASK_"))}
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(config)], cwd=self.tmp, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**env, **self.env,
                                                                        "HB_TEST_ADMIN_TOKEN": self.admin_token},
                                         start_new_session=True, preexec_fn=default_sigint)
        def up():
            if self.proc.poll() is not None: raise AssertionError(f"the hub exited "
                                                                  f"{self.proc.returncode}:\n{self.tail()}")
            try: return http("GET", f"{self.gateway}/api/health", timeout=5)[0] == 200
            except OSError: return False  # not listening yet
        wait_for(f"the gateway through the hub's proxy at {self.gateway}\n{self.tail()}", up, 120)
        return time.monotonic() - t0

    def tail(self, n: int = 30) -> str:
        try: return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError: return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None: return
        self.proc.terminate()
        try: self.proc.wait(90)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError): os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def user(self, name: str) -> str:
        "Create hub user `name` through the API (an approved sign-up joins `researchers`); a new API token of theirs."
        status, body = http("POST", f"{self.url}/hub/api/users/{name}", self.admin_token)
        assert status in (201, 409), (status, body)
        status, body = http("POST", f"{self.url}/hub/api/users/{name}/tokens", self.admin_token,
                            body={"note": "test_gateway"})
        assert status == 201, (status, body)
        return body["token"]

    def workspace_env(self, token: str) -> dict:
        "A workspace's environment as the hub gives it (40-gateway.py's variables) with the user's token."
        spec = importlib.util.spec_from_file_location("hb_gateway_40",
                                                      ROOT / "hub" / "jupyterhub_config.d" / "40-gateway.py")
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
        return {**keep, **mod.workspace_environment(self.ctx), "JUPYTERHUB_API_TOKEN": token,
                "JUPYTERHUB_API_URL": f"http://127.0.0.1:{self.port + 2}/hub/api",
                "HEDGERL_DATA_FOLDER": str(self.tmp / "ws-data")}

    def clusters(self, token: str) -> dict:
        status, body = http("GET", f"{self.gateway}/api/v1/clusters/", token, scheme="jupyterhub")
        assert status == 200, (status, body)
        return body


def workspace(hub: Hub, token: str | None, code: str, user: str | None = None, env: dict | None = None,
              **kw) -> subprocess.Popen:
    """Run `code` with .venv's python as a workspace of `user` (their system account; None: this one) would: `env`, or
    40-gateway.py's variables and `token`."""
    env = dict(env) if env is not None else hub.workspace_env(token)
    if user: env.update(HOME=pwd.getpwnam(user).pw_dir, USER=user)
    return subprocess.Popen([str(BIN / "python"), "-c", code], env=env, user=user, cwd=env.get("HOME", str(hub.tmp)),
                            text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def read_line(p: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The first line of `p`'s output starting with `prefix`; fails with the output so far when `p` ends or `timeout`
    passes."""
    lines = queue.Queue()
    if not hasattr(p, "reader"):
        p.reader = threading.Thread(target=lambda: [lines.put(l) for l in iter(p.stdout.readline,
                                                                               "")] + [lines.put(None)], daemon=True)
        p.lines = lines; p.reader.start()
    seen, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout:
        try: line = p.lines.get(timeout=1)
        except queue.Empty: continue
        if line is None: break  # the process ended
        if line.startswith(prefix): return line
        seen.append(line)
    raise AssertionError(f"no {prefix} line within {timeout} s:\n" + "".join(seen[-40:]))


def scratch(user: str) -> set:
    "What `user`'s uid owns among /tmp/dask* (a cluster's working directory, Dask's scratch space), with their mtimes."
    uid = pwd.getpwnam(user).pw_uid
    return {(str(p), p.stat().st_mtime_ns) for p in Path("/tmp").glob("dask*") if p.stat().st_uid == uid}


def alive(pid: int) -> bool:
    "Whether process `pid` runs (a zombie waiting for init does not)."
    try: return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError): return False


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    os.chmod(tmp, 0o755)  # the users' workspaces run from here
    # a, b: accounts; n: approved, no account; c: not approved
    names = {k: f"hb{k}{secrets.token_hex(3)}" for k in ("a", "b", "n", "c")}
    h = Hub(tmp)
    h.names = names
    try:
        for k in ("a", "b"): make_account(names[k])
        h.ctx.state.mkdir(mode=0o700)
        for k in ("a", "b", "n"): set_hub_password(h.ctx.settings.hub.db_url, names[k], secrets.token_urlsafe(12))
        h.start_seconds = h.start()
        h.tokens = {k: h.user(v) for k, v in names.items()}
        yield h
    finally:
        h.stop()
        for k in ("a", "b"): delete_account(names[k])


def test_gateway_serves_and_refuses(hub):
    """The gateway answers through the hub's proxy; anonymous callers and users outside `researchers` get 401; no
    system account, or too many workers: the reason."""
    print(f"hub start to gateway ready: {hub.start_seconds:.1f} s")
    assert http("GET", f"{hub.gateway}/api/v1/clusters/")[0] == 401
    # not approved: no scope
    assert http("GET", f"{hub.gateway}/api/v1/clusters/", hub.tokens["c"], scheme="jupyterhub")[0] == 401
    assert hub.clusters(hub.tokens["a"]) == {}
    p = workspace(hub, hub.tokens["n"], "from hedgerl.backtest import dask_client\n"
                  "try: dask_client()\nexcept ValueError as e: print('REFUSED', e)\n")
    out, _ = p.communicate(timeout=120)
    assert (f"REFUSED the Dask gateway at {hub.gateway}" in out
            and f"user '{hub.names['n']}' has no system account" in out), out
    n = os.cpu_count() + 1  # one worker per core at most (dask/gateway_config.d/20-backend.local.py)
    p = workspace(hub, hub.tokens["a"], f"from hedgerl.backtest import dask_client\n"
                  f"try: dask_client(n_workers={n})\nexcept ValueError as e: print('REFUSED', e)\n",
                  user=hub.names["a"])
    out, _ = p.communicate(timeout=120)
    assert (f"REFUSED n_workers = {n}: the Dask gateway says Scale request of {n} workers would exceed resource limit "
            f"of {n - 1} workers") in out, out
    wait_for("the refused cluster's processes gone", lambda: not processes_of(hub.names["a"]), 60)
    p = workspace(hub, hub.tokens["c"], "from hedgerl.backtest import dask_client\n"
                  "try: dask_client()\nexcept PermissionError as e: print('REFUSED', e)\n")
    out, _ = p.communicate(timeout=120)
    assert ("REFUSED" in out and "refused the hub token in JUPYTERHUB_API_TOKEN (401" in out
            and "access:services!service=dask-gateway" in out), out
    # no secret in the hub's output (the gateway logs there too)
    log = hub.log.read_text(errors="replace")
    key = base64.b64encode(bytes.fromhex(hub.ctx.secret("dask_gateway_encrypt_key"))).decode()
    for name, value in [("database key", key), ("admin token", hub.admin_token), *((f"token of {k}", t) for k,
                                                                                   t in hub.tokens.items())]:
        assert value not in log, f"the {name} is in the hub's log"


USER_A = """
import json, os, sys, time, urllib.request
import numpy as np
from hedgerl.backtest import backtest, dask_client
from hedgerl.baselines import DeltaHedge
kw = dict(n_paths=200_000, seed=20261126)
serial = backtest(DeltaHedge(), "cao2021-gbm-1m-2d", **kw)
t0 = time.perf_counter()
client = dask_client(n_workers=2)
seconds = time.perf_counter() - t0
with client:
    workers = client.run(lambda: (os.getuid(), os.environ.get("HEDGERL_DASK_CLUSTER"),
                                  os.environ.get("MALLOC_TRIM_THRESHOLD_")))
    d = backtest(DeltaHedge(), "cao2021-gbm-1m-2d", client=client, **kw)
    with urllib.request.urlopen(client.dashboard_link, timeout=30) as r:
        page = r.status, "Dask" in r.read().decode(errors="replace")
    print("READY " + json.dumps({"seconds": seconds, "name": client.cluster.name, "link": client.dashboard_link,
        "workers": sorted(workers.values()), "scheduler_uid": client.run_on_scheduler(os.getuid), "dashboard": page,
        "equal": {k: bool(np.array_equal(getattr(d, k), getattr(serial, k)))
                  for k in ("pnl", "cost", "option_pnl", "hedge_pnl", "premium", "holdings")}}), flush=True)
    sys.stdin.readline()  # the test checks user B meanwhile
print("CLOSED", flush=True)
"""


@pytest.mark.slow
def test_user_cluster_end_to_end(hub):
    "From A's workspace: a 2-worker cluster as A, bit for bit; B cannot list or reach it; idle and stopped clusters go."
    a, b = hub.names["a"], hub.names["b"]
    scratch_before = scratch(a)  # (a uid used by an earlier account may own some)
    # B's cluster with no client: the gateway shuts it down after [gateway] idle_timeout (checked at the end)
    status, body = http("POST", f"{hub.gateway}/api/v1/clusters/", hub.tokens["b"], scheme="jupyterhub",
                        body={"cluster_options": {}})
    assert status == 201, (status, body)
    idle_name, idle_t0 = body["name"], time.monotonic()

    # A's real workspace (the hub's spawner): its environment is what A's kernels get, its token the server's own
    assert http("POST", f"{hub.url}/hub/api/users/{a}/server", hub.admin_token)[0] in (201, 202)
    wait_for("A's workspace ready", lambda: (http("GET", f"{hub.url}/hub/api/users/{a}",
                                                  hub.admin_token)[1].get("servers", {}).get("",
                                                          {}) or {}).get("ready"), 120)
    pid, = subprocess.run(["pgrep", "-u", a, "-f", "jupyterhub-singleuser"], capture_output=True,
                          text=True).stdout.split()
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    assert env["HEDGERL_DASK_CLUSTER"] == "gateway" and env["DASK_GATEWAY__ADDRESS"] == hub.gateway and env[
            "JUPYTERHUB_API_TOKEN"]
    tokens = http("GET", f"{hub.url}/hub/api/users/{a}/tokens", hub.admin_token)[1]["api_tokens"]
    server_token, = [t for t in tokens if t["note"].startswith("Server at")]
    assert "access:services!service=dask-gateway" in server_token["scopes"], server_token["scopes"]
    p = workspace(hub, None, USER_A, user=a, env=env, stdin=subprocess.PIPE)
    try:
        line = read_line(p, "READY", 300)
        r = json.loads(line[len("READY "):])
        print(f"2-worker gateway cluster in {r['seconds']:.1f} s (goal < 20 s)")
        uid = pwd.getpwnam(a).pw_uid
        # A's account, A's settings, no malloc trim
        assert r["workers"] == [[uid, "gateway", None]] * 2 and r["scheduler_uid"] == uid
        assert all(r["equal"].values()), r["equal"]
        assert r["dashboard"] == [200, True] and r["link"] == f"{hub.gateway}/clusters/{r['name']}/status"
        assert r["seconds"] < 60, r["seconds"]
        name = r["name"]
        assert list(hub.clusters(hub.tokens["a"])) == [name]
        # B: A's cluster is not in B's list, and B can neither read, stop nor reach it
        assert name not in hub.clusters(hub.tokens["b"])
        for method in ("GET", "DELETE"):
            status, _ = http(method, f"{hub.gateway}/api/v1/clusters/{name}", hub.tokens["b"], scheme="jupyterhub")
            assert status in (403, 404), (method, status)
        probe = workspace(hub, hub.tokens["b"], f"from distributed import Client\ntry: "
                          f"Client('gateway://127.0.0.1:{hub.gateway_port}/{name}', timeout=10)\n"
                          "except Exception as e: print('NO', type(e).__name__)\nelse: print('CONNECTED')\n", user=b)
        out, _ = probe.communicate(timeout=120)
        # the scheduler wants the cluster's TLS credentials, which only A gets
        assert "NO" in out and "CONNECTED" not in out, out
        assert list(hub.clusters(hub.tokens["a"])) == [name]
        p.stdin.write("\n"); p.stdin.flush()
        read_line(p, "CLOSED", 60)
        assert p.wait(60) == 0
    finally:
        if p.poll() is None: p.kill()
    # closing the client shut A's cluster down: no cluster, no process of A but the workspace
    assert http("DELETE", f"{hub.url}/hub/api/users/{a}/server", hub.admin_token)[0] in (202, 204)
    wait_for("A's cluster and workspace gone", lambda: not hub.clusters(hub.tokens["a"]) and not processes_of(a), 60)
    wait_for(f"B's idle cluster gone after {IDLE} s", lambda: idle_name not in hub.clusters(hub.tokens["b"]),
             IDLE * 1.5 + 30)
    assert time.monotonic() - idle_t0 >= IDLE * 0.9
    wait_for("B's idle cluster's processes gone", lambda: not processes_of(b), 30)

    # a cluster left running, then the hub stops: the gateway stops it, nothing of A is left
    status, body = http("POST", f"{hub.gateway}/api/v1/clusters/", hub.tokens["a"], scheme="jupyterhub",
                        body={"cluster_options": {}})
    assert status == 201
    left = body["name"]
    status, body = http("GET", f"{hub.gateway}/api/v1/clusters/{left}?wait", hub.tokens["a"], scheme="jupyterhub",
                        timeout=120)
    assert status == 200 and body["status"] == "RUNNING", body
    assert http("POST", f"{hub.gateway}/api/v1/clusters/{left}/scale", hub.tokens["a"], scheme="jupyterhub",
                body={"count": 1})[0] == 200
    wait_for("A's second cluster running with a worker", lambda: len(processes_of(a)) >= 2, 60)
    gateway, = subprocess.run(["pgrep", "-P", str(hub.proc.pid), "-f", "dask-gateway-server"], capture_output=True,
                              text=True).stdout.split()
    t0 = time.monotonic()
    hub.stop()
    print(f"hub stopped in {time.monotonic() - t0:.1f} s")
    assert hub.proc.returncode is not None and not alive(int(gateway))  # the hub stopped its service
    assert not processes_of(a), processes_of(a)
    assert "Stopping 1 active clusters" in hub.log.read_text(errors="replace")
    assert scratch(a) == scratch_before, scratch(a) ^ scratch_before  # nothing of A's clusters left in /tmp
