"""Driving the real platform from tests: start it as `make up` does (`hedgerl hub up`) on free ports in its own data
folder, run code in users' kernels over the Jupyter protocol, find what is left running. Forms, logins, tokens and
spawns go through `hedgerl.platform.HubClient`."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port_block(n: int = 3, start: int = 20000, stop: int = 40000) -> int:
    "A port p with p .. p+n-1 all free on 127.0.0.1 (the hub needs its port, +1 and +2)."
    for _ in range(200):
        p = int.from_bytes(os.urandom(2), "big") % (stop - start) + start
        socks = []
        try:
            for q in range(p, p + n):
                s = socket.socket(); s.bind(("127.0.0.1", q)); socks.append(s)
            return p
        except OSError: continue
        finally:
            for s in socks: s.close()
    raise RuntimeError("no free block of ports")


def platform_env(data: Path, registry_url: str | None = None, **settings: str) -> dict:
    """Environment of a platform in its own data folder, on free ports; `registry_url` (e.g. a `fresh_pg_database` of
    conftest) for the service's registry, `settings` more `HEDGERL_*` overrides (`HEDGERL_SERVICE_MAX_JOBS="2"`)."""
    hub = free_port_block(3)
    gw, svc = free_port_block(1), free_port_block(1)
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HEDGERL_DATA_FOLDER": str(data),
            "HEDGERL_HUB_PORT": str(hub), "HEDGERL_GATEWAY_PORT": str(gw), "HEDGERL_SERVICE_PORT": str(svc),
            "PYTHONUNBUFFERED": "1", **({"HEDGERL_REGISTRY_URL": registry_url} if registry_url else {}), **settings}


def admin_login(up: "Up") -> tuple[str, str]:
    "The administrator's name and password, as the first `hedgerl hub up` printed them."
    m = re.search(r"first login: user '(\w+)', password '([^']+)'", up.text())
    if m is None: raise AssertionError(f"no first-login line in:\n{up.text()}")
    return m.groups()


def approved_user(up: "Up", name: str | None = None, **token_request) -> tuple[str, str]:
    """A new hub user approved as the admin would (no system account is made: it never spawns), logged in through the
    real form (which puts it in `researchers`); its name and an API token (`token_request`: e.g. scopes=[...])."""
    from hedgerl.core import load_settings
    from hedgerl.platform import HubClient, set_hub_password
    import secrets
    name = name or f"u{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    set_hub_password(load_settings(environ=up.env).hub.db_url, name, password)
    hub = HubClient(up.url)
    return name, hub.token(hub.login(name, password), name, **token_request)


class Up:
    "`hedgerl hub up` (what `make up` runs) as a process; `wait` until it prints that the platform is up."
    def __init__(self, env: dict, *extra: str, sigint=signal.SIG_DFL):
        self.env, self.url = env, f"http://127.0.0.1:{env['HEDGERL_HUB_PORT']}"
        self.out_path = Path(env["HEDGERL_DATA_FOLDER"]).parent / f"up-{uuid.uuid4().hex[:6]}.out"
        self.out = open(self.out_path, "w")
        self.proc = subprocess.Popen([str(BIN / "hedgerl"), "hub", "up", *extra], env=env, cwd=ROOT, stdout=self.out,
                                     stderr=subprocess.STDOUT,
                                     # default: as from a terminal, even under a runner that ignores SIGINT
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))

    def text(self) -> str: return self.out_path.read_text()

    def wait(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        while "stop with Ctrl-C" not in self.text():
            if self.proc.poll() is not None: raise AssertionError(f"hedgerl hub up exited "
                                                                  f"{self.proc.returncode}:\n{self.text()}")
            if time.monotonic() - t0 > timeout: raise AssertionError(f"not up within {timeout} s:\n{self.text()}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def stop(self, sig=signal.SIGINT, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try: self.proc.wait(timeout)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.out.close()
        return self.proc.returncode


class Kernel:
    "A kernel in a user's workspace, driven over the Jupyter websocket protocol through the hub's proxy."
    def __init__(self, url: str, name: str, token: str, kernel: str = "hedgerl"):
        import websocket
        self.base, self.h = f"{url}/user/{name}", {"Authorization": f"token {token}"}
        r = requests.post(f"{self.base}/api/kernels", json={"name": kernel}, headers=self.h)
        assert r.status_code == 201, r.text
        self.id = r.json()["id"]
        self.ws = websocket.create_connection(f"{self.base.replace('http', 'ws', 1)}/api/kernels/{self.id}/channels",
                                              header=[f"Authorization: token {token}"], timeout=600)

    def run(self, code: str, timeout: float = 300) -> str:
        "Execute `code`; its stdout. An exception in the kernel raises AssertionError with its traceback."
        mid = uuid.uuid4().hex
        self.ws.send(json.dumps({"header": {"msg_id": mid, "msg_type": "execute_request", "username": "",
                                            "session": mid, "version": "5.3"},
                                 "parent_header": {}, "metadata": {}, "channel": "shell",
                                 "content": {"code": code, "silent": False, "store_history": False,
                                             "user_expressions": {}, "allow_stdin": False}}))
        out, err, reply, idle, t0 = [], None, None, False, time.monotonic()
        while reply is None or not idle:  # the reply (shell) may come before the output (iopub): wait for both
            if time.monotonic() - t0 > timeout: raise AssertionError(f"kernel did not answer within {timeout} s")
            msg = json.loads(self.ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != mid: continue
            t, c = msg["msg_type"], msg["content"]
            if t == "stream" and c["name"] == "stdout": out.append(c["text"])
            elif t == "error": err = "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", l) for l in c["traceback"])
            elif t == "execute_reply" and msg["channel"] == "shell": reply = c
            elif t == "status" and c.get("execution_state") == "idle": idle = True
        if err or reply["status"] != "ok": raise AssertionError(f"in the kernel:\n{err or reply}")
        return "".join(out)

    def close(self):
        try: self.ws.close()
        finally: requests.delete(f"{self.base}/api/kernels/{self.id}", headers=self.h)


def callback_errors(up: "Up") -> list[str]:
    """The service's failed Panel callbacks, from the hub's log (a page that changes its document outside the lock
    fails there, not in the browser)."""
    log = (Path(up.env["HEDGERL_DATA_FOLDER"]) / "hub" / "hub.log").read_text()
    return [line for line in log.splitlines() if "Exception in callback" in line or "_pending_writes" in line]


def platform_processes(env: dict) -> list[str]:
    """Command lines of live processes that belong to the platform of `env` (its hub, proxy, services, workspaces,
    clusters)."""
    data, hub_api = env["HEDGERL_DATA_FOLDER"], f"127.0.0.1:{int(env['HEDGERL_HUB_PORT']) + 2}/hub/api".encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid(): continue
        try:
            env = (p / "environ").read_bytes()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError: continue
        if f"HEDGERL_DATA_FOLDER={data}".encode() in env or hub_api in env or str(data) in cmd:
            try: state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError): state = "?"
            if state != "Z": found.append(f"{p.name}: {cmd}")
    return found
