"""The `hedgerl` command as a user runs it: help, bad settings, and `hedgerl up` serving JupyterLab."""
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

from conftest import BIN, ROOT, run


def test_help_lists_every_command():
    p = run(["hedgerl", "--help"], check=True)
    for cmd in ("up", "price", "bench", "settings"):
        assert re.search(rf"^\s+{cmd}\s", p.stdout, re.M), cmd
    for cmd in ("up", "price", "bench", "settings"):
        assert run(["hedgerl", cmd, "--help"]).returncode == 0


def test_bad_setting_names_the_key():
    p = run(["hedgerl", "settings"], env={"HEDGERL_SERVICE_PORT": "eighty"})
    assert p.returncode == 2
    assert "[service] port = 'eighty' (from HEDGERL_SERVICE_PORT)" in p.stderr


def test_settings_override_from_environment():
    p = run(["hedgerl", "settings"], env={"HEDGERL_REGISTRY_URL": "postgresql+psycopg://u@db/hedgerl"}, check=True)
    assert "url = postgresql+psycopg://u@db/hedgerl" in p.stdout
    assert f"# from {ROOT / 'settings.ini'}" in p.stdout


def test_bench_quick_writes_json(tmp_path):
    p = run(["hedgerl", "bench", "--quick", "--out", str(tmp_path), "--suite", "smoke"], timeout=600, check=True)
    doc = json.loads((tmp_path / "smoke.json").read_text())
    names = [r["name"] for r in doc["results"]]
    assert any(n.startswith("GBM") for n in names) and any(n.startswith("Heston") for n in names)
    assert any(n.startswith("Black-Scholes") for n in names)
    for r in doc["results"]:
        assert r["rate"] > 0 and r["reference_rate"] > 0 and abs(r["ratio"] - r["rate"] / r["reference_rate"]) < 1e-12
    assert "hedgerl" in p.stdout and "ratio" in p.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _start_up(port):
    "`hedgerl up` on `port` in a session of its own; (process, URL) once it printed the URL."
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HEDGERL_LAB_PORT": str(port)}
    proc = subprocess.Popen([str(BIN / "hedgerl"), "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    url, deadline = None, time.time() + 120
    while url is None and time.time() < deadline and proc.poll() is None:
        m = re.search(r"open (http://127\.0\.0\.1:\d+/lab\?token=\S+)", proc.stdout.readline())
        if m: url = m.group(1)
    assert url, "hedgerl up printed no URL"
    return proc, url


def _answers(port) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1): return True
    except OSError: return False


def _stops_serving(proc, port, timeout=30) -> bool:
    deadline = time.time() + timeout
    while _answers(port) and time.time() < deadline: time.sleep(0.2)
    return not _answers(port)


def test_up_serves_jupyterlab_on_the_notebooks():
    port = _free_port()
    proc, url = _start_up(port)
    try:
        token = url.split("token=")[1]
        base = f"http://127.0.0.1:{port}"
        req = urllib.request.Request(f"{base}/api/contents", headers={"Authorization": f"token {token}"})
        status = json.load(urllib.request.urlopen(req, timeout=10))  # the URL is printed once the server answers
        names = {c["name"] for c in status["content"]}
        assert {"00_core.ipynb", "01_pricing.ipynb", "tutorials"} <= names
        # without the token the server refuses
        try:
            urllib.request.urlopen(f"{base}/api/contents", timeout=5)
            raise AssertionError("JupyterLab answered without a token")
        except urllib.error.HTTPError as e:
            assert e.code == 403
        proc.send_signal(signal.SIGTERM)  # to hedgerl only, not its process group: it must stop JupyterLab itself
        assert proc.wait(timeout=30) == 0
        assert _stops_serving(proc, port), "JupyterLab still serves after hedgerl up got SIGTERM"
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL); proc.wait()


def test_up_killed_takes_jupyterlab_with_it():
    port = _free_port()
    proc, _ = _start_up(port)
    try:
        proc.kill(); proc.wait()  # kill -9: no handler runs; the parent-death signal (prctl) stops JupyterLab
        assert _stops_serving(proc, port), "JupyterLab still serves after hedgerl up was killed"
    finally:
        try: os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError: pass


def test_leaderboard_writes_markdown_and_json(tmp_path):
    p = run(["hedgerl", "leaderboard", "--scenarios", "cao2021-gbm-1m-5d", "--n-paths", "3000", "--train-paths", "2000",
             "--n-boot", "10", "--out", str(tmp_path)], timeout=600, check=True)
    records = json.loads((tmp_path / "leaderboard.json").read_text())
    assert {r["strategy"] for r in records} == {"delta", "no-hedge", "whalley-wilmott", "fixed-band"}
    for r in records:
        for key in ("scenario", "strategy", "learned", "n_paths", "seed", "objective", "objective_se", "metrics"):
            assert key in r, key
        assert r["n_paths"] == 3000 and r["learned"] is False and r["objective_se"] > 0
    assert "## cao2021-gbm-1m-5d" in (tmp_path / "leaderboard.md").read_text()
    assert "leaderboard.md" in p.stdout


def test_scenario_file_with_a_typo_fails_before_running(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\nbook:\n- {kind: call, strike: 100, maturity: 20, quantity: -1}\ncosts: {proportionl: 0.01}\n")
    p = run(["hedgerl", "backtest", "delta", str(f)])
    assert p.returncode == 2 and "costs: unknown field 'proportionl'" in p.stderr
