"""The `hedgerl` command as a user runs it: help, bad settings, and `hedgerl up` serving JupyterLab."""
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

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


@pytest.mark.slow
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
    proc = subprocess.Popen([str(BIN / "hedgerl"), "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
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
    f.write_text("name: mine\nbook:\n- {kind: call, strike: 100, maturity: 20, quantity: -1}\ncosts: {proportionl: "
                 "0.01}\n")
    p = run(["hedgerl", "backtest", "delta", str(f)])
    assert p.returncode == 2 and "costs: unknown field 'proportionl'" in p.stderr


def _cli(argv, capsys):
    "Run `hedgerl argv` in this process: (status, stdout, stderr)."
    from hedgerl.cli import main
    try: code = main(argv)
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _bad_invocations(d):
    scn, reg = "cao2021-gbm-1m-1d", ["--registry", f"sqlite:///{d}/r.sqlite"]
    (d / "empty.yaml").write_text("")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "costs.yaml").write_text("name: x\nbook:\n- {kind: call, strike: 100, maturity: 20, quantity: -1}\ncosts: "
                                  "0.01\n")
    (d / "prices.csv").write_text("date,close\n2020-01-02,abc\n")
    price = ["price", "--spot", "100", "--strike", "100", "--maturity", "1"]
    train = ["train", "ntb", scn, "--budget", "5", *reg]
    return [
        [*price, "--vol", "-0.2"], [*price, "--vol", "nan"], [*price, "--price", "200"], ["price", "--spot", "100",
                                                                                          "--strike", "0", "--maturity",
                                                                                          "1", "--vol", "0.2"],
        [*price], ["price", "--spot", "abc", "--strike", "1", "--maturity", "1", "--vol", "0.2"],
        ["scenarios", "--show", "nope"], ["nosuchcommand"],
        ["backtest", "delta", "nope"], ["backtest", "delt", scn], ["backtest", "delta", scn, "--n-paths", "1"],
        ["backtest", "delta", scn, "--n-paths", "-5"], ["backtest", "delta", scn, "--n-boot", "-1"],
        ["backtest", "delta", str(d / "empty.yaml")], ["backtest", "delta", str(d / "list.yaml")], ["backtest", "delta",
                str(d / "costs.yaml")],
        ["backtest", "delta", str(d / "missing.yaml")], ["backtest", "delta", scn, "--historical",
                                                         str(d / "prices.csv")],
        ["backtest", "delta", scn, "--historical", str(d / "nosuch.csv")], ["backtest", "delta", scn, "--historical",
                                                                            "bokeh:NOPE"],
        ["leaderboard", "--scenarios", "nope"], ["leaderboard", "--out", "/proc/hedgerl-lb"], ["leaderboard",
                "--strategies", "nope"],
        ["results", "--only", "nope", "--no-write"], ["results", "--out", "/proc/hedgerl-res"],
        ["db", "status", "--url", f"sqlite:///{d}/typo/x.sqlite"], ["db", "status", "--url",
                                                                    "mysql://root@127.0.0.1/test"],
        ["db", "upgrade", "--url", "sqlite:////proc/hedgerl/r.sqlite"], ["db", "status", "--url",
                                                                         str(d / "empty.yaml")],
        ["db", "status", "--url", f"sqlite:///{d}/costs.yaml"], ["db", "frobnicate"],
        ["train", "ntb", scn, "--budget", "0", *reg], ["train", "ntb", "nope", "--budget", "5", *reg], ["train", "nope",
                scn, "--budget", "5", *reg],
        ["train", "--resume", "99", *reg], ["train", "--resume", "-1", *reg], [*train, "--objective", "foo"], [*train,
                "--objective", "es:abc"],
        [*train, "--param", "lr=abc"], [*train, "--param", "lr"], [*train, "--device", "tpu"], [*train, "--threads",
                "-1"],
        [*train, "--valid-paths", "0"], [*train, "--test-paths", "-1"], [*train, "--notebook", str(d / "nope.ipynb")],
        [*train, "--runs-dir", "/proc/hedgerl-runs"], ["train", "ntb", str(d / "costs.yaml"), "--budget", "5", *reg],
        ["sweep", "ntb", scn, "--budget", "5", "--grid", "lr=", *reg], ["sweep", "ntb", scn, "--budget", "5", *reg],
        ["sweep", "ntb", scn, "--budget", "5", "--grid", "hidden=8,0", *reg],
        ["tune", "ntb", scn, "--space", "lr=abc", *reg], ["tune", "ntb", scn, "--space", "lr=1:0", *reg], ["tune",
                "ntb", scn, "--trials", "0", *reg],
        ["tune", "ntb", scn, "--space", "hidden=8,abc", *reg], ["tune", "ppo", scn, *reg],
        ["bench", "--only", "nope", "--no-write"], ["bench", "--out", "/proc/hedgerl-bench"],
        ["up", "--port", "0"], ["up", "--port", "99999"], ["up", "--host", "a b"], ["up", "--notebooks",
                                                                                    str(d / "nope")],
    ]


def test_no_traceback_reaches_a_user(tmp_path, capsys):
    "Hostile input to every command: status 2 (a named, expected error), one line on stderr, nothing recorded."
    from hedgerl.registry import Registry
    for argv in _bad_invocations(tmp_path):
        code, out, err = _cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and " error: " in err, (argv,
                code, err)
    if (tmp_path / "r.sqlite").exists(): assert len(Registry(f"sqlite:///{tmp_path}/r.sqlite").runs()) == 0


def test_unwritable_data_folder_is_named(tmp_path, capsys, monkeypatch):
    from hedgerl.core import settings
    monkeypatch.setenv("HEDGERL_DATA_FOLDER", "/proc/hedgerl-data")
    settings(reload=True)
    try:
        for argv, msg in ((["db", "upgrade"], "cannot create the folder of the registry database "
                           "sqlite:////proc/hedgerl-data/registry.sqlite"),
                          (["train", "ntb", "cao2021-gbm-1m-1d", "--budget", "5"], "HEDGERL_DATA_FOLDER"),
                          (["train", "ntb", "cao2021-gbm-1m-1d", "--budget", "5", "--registry",
                            f"sqlite:///{tmp_path}/r.sqlite"],
                           "the runs folder '/proc/hedgerl-data/runs' (setting [data] folder, environment "
                           "HEDGERL_DATA_FOLDER): cannot create it")):
            code, _, err = _cli(argv, capsys)
            assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    finally:
        monkeypatch.undo(); settings(reload=True)


def test_train_says_what_it_learns_while_it_trains(tmp_path):
    """hedgerl train prints each validation's metrics as the run logs them (it printed nothing until the end), then the
    outcome."""
    p = run(["hedgerl", "train", "ntb", "cao2021-gbm-1m-1d", "--budget", "20", "--valid-every", "10", "--registry",
             f"sqlite:///{tmp_path}/r.sqlite",
             "--runs-dir", str(tmp_path / "runs")], timeout=600, check=True)
    steps = re.findall(
            r"run 1: step (\d+): train/lr \S+, train/objective \S+, train/seconds \S+, valid/objective (\S+)", p.stderr)
    assert [s for s, _ in steps] == ["10", "20"], p.stderr
    assert ("run 1: training ntb on cao2021-gbm-1m-1d" in p.stderr
            and "hedgerl: run 1 finished: test objective" in p.stdout)


def _without(modules, tmp_path):
    "An environment whose Python processes (papermill's kernels too) cannot import `modules`, as if not installed."
    shim = tmp_path / "shim"; shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return {"PYTHONPATH": str(shim), "HEDGERL_DATA_FOLDER": str(tmp_path)}


@pytest.mark.parametrize("module, argv, extra", [
    ("bokeh_sampledata", ["backtest", "delta", "cao2021-gbm-1m-1d", "--historical", "bokeh:AAPL"], "data"),
    ("papermill", ["train", "ntb", "cao2021-gbm-1m-1d", "--budget", "5", "--registry", "REG"], "runs"),
    ("papermill", ["report", "derman-kamal-1m-daily", "--no-pdf", "--n-paths", "200", "--out-dir", "OUT"], "reports"),
    ("optuna", ["tune", "ntb", "cao2021-gbm-1m-1d", "--trials", "1", "--registry", "REG"], "runs"),
    ("torch", ["train", "deep-hedger", "cao2021-gbm-1m-1d", "--budget", "5", "--registry", "REG"], "torch"),
    ("stable_baselines3", ["train", "ppo", "cao2021-gbm-1m-1d", "--budget", "5", "--registry", "REG"], "rl"),  # kernel
])
def test_a_missing_package_names_its_extra(tmp_path, module, argv, extra):
    "Without an optional package, the command's last line names the extra that brings it; no traceback."
    argv = [{"REG": f"sqlite:///{tmp_path}/r.sqlite", "OUT": str(tmp_path / "out")}.get(a, a) for a in argv]
    p = run(["hedgerl", *argv], env=_without([module], tmp_path), timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr, p.stderr
    assert f"hedgerl[{extra}]" in last and last.startswith(f"hedgerl {argv[0]}: "), p.stderr
