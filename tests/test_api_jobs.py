"""`backtests` and `trainings` of the REST API on a real platform (`hedgerl hub up` on loopback: proxy, hub, gateway and
the hedgerl service), called through the hub's proxy with real users' tokens: a backtest job prints what `hedgerl
backtest` prints for the same inputs; a training started through the API is a run of its caller's in the registry with
its executed notebook, and its Server-Sent Events stream delivers metrics while it runs; DELETE leaves a running
training interrupted with its checkpoint; another user gets 404 for a private job (an admin reads it, and changes
nothing); the service killed mid-job (kill -9: the hub starts it again) closes its jobs with the reason, and leaves no
training process (slow). Once more with the registry on PostgreSQL (slow)."""
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from platform_tools import BIN, ROOT, Up, admin_login, approved_user, platform_env, platform_processes

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

API = "/services/hedgerl/api/v1"
SCENARIO = "cao2021-gbm-1m-1d"
SMOKE = {"agent": "ntb", "scenario": SCENARIO, "params": {"n_paths": 500}, "valid_paths": 200, "test_paths": 500,
         "valid_every": 10}


def _platform(data: Path, registry_url: str | None):
    from hedgerl.platform import HubClient
    up = Up(platform_env(data, registry_url))
    try:
        up.wait()
        users = {k: approved_user(up, f"j{k}{secrets.token_hex(3)}") for k in ("a", "b")}
        admin, password = admin_login(up)
        hub = HubClient(up.url)
        users["admin"] = (admin, hub.token(hub.login(admin, password), admin))
        return up, SimpleNamespace(up=up, env=up.env, data=data, url=up.url + API, users=users)
    except BaseException:
        up.stop(); raise


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def platform(request, tmp_path_factory):
    if request.param == "postgresql":
        from conftest import fresh_pg_database
        with fresh_pg_database("hedgerl_api_jobs", "the service's registry on PostgreSQL") as url:
            up, p = _platform(tmp_path_factory.mktemp("jobs-pg") / "data", url)
            try: yield p
            finally: up.stop()
    else:
        up, p = _platform(tmp_path_factory.mktemp("jobs") / "data", None)
        try: yield p
        finally: up.stop()


def call(p, method: str, path: str, who: str | None = "a", **kw) -> requests.Response:
    headers = {"Authorization": f"token {p.users[who][1]}", **kw.pop("headers", {})} if who else kw.pop("headers", {})
    return requests.request(method, f"{p.url}/{path}", headers=headers, timeout=120, **kw)


def wait(p, kind: str, id: int, timeout: float = 300, who: str = "a") -> dict:
    "Poll a job until it has ended (through the proxy); its last answer."
    t0 = time.monotonic()
    while (j := call(p, "GET", f"{kind}/{id}", who).json())["status"] in ("queued", "running"):
        assert time.monotonic() - t0 < timeout, j
        time.sleep(0.5)
    return j


def registry(p):
    "The service's registry, opened as the service does (the test runs as root, as the hub and the service do)."
    from hedgerl.core import load_settings
    from hedgerl.registry import Registry
    return Registry(load_settings(environ=p.env).registry.url)


def service_pid(p) -> int:
    "The pid of the platform's hedgerl service."
    pids = [int(line.split(":", 1)[0]) for line in platform_processes(p.env) if "-m hedgerl.service" in line]
    assert len(pids) == 1, platform_processes(p.env)
    return pids[0]


def test_backtest_job_prints_what_hedgerl_backtest_prints(platform):
    body = {"scenario": SCENARIO, "strategy": "fixed-band", "n_paths": 20_000, "seed": 11, "n_boot": 20,
            "train_paths": 2_000}
    r = call(platform, "POST", "backtests", json=body)
    assert r.status_code == 202 and r.headers["Location"] == f"{API}/backtests/{r.json()['id']}", r.text
    job = wait(platform, "backtests", r.json()["id"])
    cli = subprocess.run([str(BIN / "hedgerl"), "backtest", "fixed-band", SCENARIO, "--n-paths", "20000", "--seed",
                          "11", "--n-boot", "20",
                          "--train-paths", "2000"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert job["status"] == "finished" and job["report"] == cli.stdout, (job, cli.stdout)
    assert job["summary"]["objective_se"] > 0 and job["owner"] == platform.users["a"][0]
    # a job is a registry run of its caller's: the registry's own endpoint lists it
    rows = call(platform, "GET", "registry/runs", params={"experiment": "backtests"}).json()["rows"]
    assert [r["id"] for r in rows] == [job["id"]] and rows[0]["outputs"]["summary"] == job["summary"]
    platform.backtest = job["id"]


def test_training_job_is_a_run_with_its_notebook_and_streams_its_metrics(platform):
    r = call(platform, "POST", "trainings", json={**SMOKE, "budget": 150})
    assert r.status_code == 202, r.text
    tid = r.json()["id"]
    events, running = [], []
    with requests.get(f"{platform.url}/trainings/{tid}/events",
                      headers={"Authorization": f"token {platform.users['a'][1]}"},
                      stream=True, timeout=600) as s:
        assert s.status_code == 200 and s.headers["Content-Type"].startswith("text/event-stream")
        for line in s.iter_lines(decode_unicode=True):
            if line.startswith("event:"): events.append({"event": line[7:]})
            elif line.startswith("data:"):
                events[-1]["data"] = json.loads(line[6:])
                if events[-1]["event"] == "metrics" and len(running) < 2:  # while it runs: the job says so
                    running.append(call(platform, "GET", f"trainings/{tid}").json()["status"])
    steps = [e["data"]["step"] for e in events if e["event"] == "metrics"]
    assert running == ["running", "running"] and steps[:3] == [10, 20, 30] and steps[-1] == 150, events
    assert "valid/objective" in events[0]["data"]["metrics"] and events[-1] == {"event": "end", "data": {"id": tid,
            "status": "finished"}}
    job = call(platform, "GET", f"trainings/{tid}").json()
    assert job["status"] == "finished" and job["metrics"]["test/objective"] > 0 and job["last_step"] == 150, job
    assert Path(job["folder"]).parent == platform.data / "users" / platform.users["a"][0] / "runs"
    nb = json.loads(Path(job["notebook"]).read_text())
    assert any(o.get("name") == "stdout" and f"run {tid}:" in "".join(o["text"]) for c in nb["cells"]
               for o in c.get("outputs", []))
    reg = registry(platform).as_user(platform.users["a"][0])
    row = reg.runs(run_id=tid).iloc[0]
    assert (row.experiment, row.status, row.params["agent"], row.outputs["notebook"]) == ("trainings", "finished",
                                                                                          "ntb", job["notebook"])
    models = reg.models()
    # the template registered its model as A
    assert list(models[models.run_id == tid].owner) == [platform.users["a"][0]]
    m = call(platform, "GET", f"trainings/{tid}/metrics", params={"after": 140}).json()
    assert {i["step"] for i in m["items"]} == {150} and m["last_step"] == 150
    reg.engine.dispose()
    platform.training = tid


def test_delete_leaves_a_running_training_interrupted_with_its_checkpoint(platform):
    tid = call(platform, "POST", "trainings", json={**SMOKE, "budget": 100_000}).json()["id"]
    t0 = time.monotonic()
    while (j := call(platform, "GET", f"trainings/{tid}").json())["last_step"] is None:
        assert time.monotonic() - t0 < 180, j
        time.sleep(0.5)
    r = call(platform, "DELETE", f"trainings/{tid}")
    assert r.status_code in (200, 202), r.text
    j = wait(platform, "trainings", tid, timeout=120)
    name = platform.users["a"][0]
    assert (j["status"], j["reason"]) == ("interrupted", f"stopped by {name} (DELETE trainings/{tid})"), j
    assert Path(j["checkpoint"]).is_file() and j["last_step"] < 100_000
    assert not [l for l in platform_processes(platform.env) if "hedgerl.jobs" in l or "ipykernel" in l]
    r = call(platform, "DELETE", f"trainings/{tid}")
    assert r.status_code == 409 and "interrupted" in r.json()["detail"]


def test_another_user_gets_404_and_an_admin_reads_but_changes_nothing(platform):
    b, a = platform.users["b"][0], platform.users["a"][0]
    for path in (f"backtests/{platform.backtest}", f"trainings/{platform.training}",
                 f"trainings/{platform.training}/metrics",
                 f"trainings/{platform.training}/events"):
        r = call(platform, "GET", path, "b")
        assert r.status_code == 404 and r.json()["detail"].endswith(f" visible to user '{b}'"), (path, r.text)
        assert call(platform, "GET", path, "admin").status_code == 200, path
    for path in (f"backtests/{platform.backtest}", f"trainings/{platform.training}"):
        assert call(platform, "DELETE", path, "b").status_code == 404
        r = call(platform, "DELETE", path, "admin")
        assert r.status_code == 403 and f"belongs to '{a}'" in r.json()["detail"]
    assert call(platform, "GET", "backtests", "b").json()["total"] == 0 and call(platform, "GET", "backtests",
                                                                                 "admin").json()["total"] >= 1
    assert call(platform, "GET", f"backtests/{platform.backtest}", None).status_code == 401


@pytest.mark.slow  # about 25 s: a training and a million-path backtest under way, the hub's restart of the service
def test_the_service_killed_mid_job_closes_its_jobs_with_the_reason(platform):
    from hedgerl.jobs import RESTARTED, STOPPED
    tid = call(platform, "POST", "trainings", json={**SMOKE, "budget": 100_000}).json()["id"]
    bid = call(platform, "POST", "backtests", json={"scenario": SCENARIO, "strategy": "delta", "n_paths": 1_000_000,
                                                    "n_boot": 100}).json()["id"]
    t0 = time.monotonic()
    while call(platform, "GET", f"trainings/{tid}").json()["last_step"] is None or \
            call(platform, "GET", f"backtests/{bid}").json()["status"] != "running":
        assert time.monotonic() - t0 < 180
        time.sleep(0.5)
    old = service_pid(platform)
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()  # the hub notices (it polls its services) and starts the service again
    while True:
        assert time.monotonic() - t0 < 120, platform.up.text()[-3000:]
        try:
            if requests.get(f"{platform.url}/health", timeout=5).status_code == 200 and service_pid(
                    platform) != old: break
        except (requests.RequestException, AssertionError): pass
        time.sleep(1)
    restart_s = time.monotonic() - t0
    b = call(platform, "GET", f"backtests/{bid}").json()
    assert (b["status"], b["reason"]) == ("failed", RESTARTED) and b["error"].startswith(RESTARTED), b
    t = wait(platform, "trainings", tid, timeout=60)
    assert t["status"] == "interrupted" and t["reason"] in (STOPPED, RESTARTED) and Path(t["checkpoint"]).is_file(), t
    # nothing of the old service is left: no training process or kernel, and no Dask worker of its LocalCluster (the new
    # service makes its own on its first backtest)
    assert not [l for l in platform_processes(platform.env) if "hedgerl.jobs" in l or "ipykernel" in l
                or "spawn_main" in l]
    print(f"service restarted by the hub {restart_s:.1f} s after kill -9")
    # the new service runs jobs
    j = wait(platform, "backtests", call(platform, "POST", "backtests", json={"scenario": SCENARIO, "strategy": "delta",
                                                                              "n_paths": 2_000}).json()["id"])
    assert j["status"] == "finished", j
