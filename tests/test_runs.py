"""Training runs end to end: papermill executions of nbs/runs/train.ipynb recorded in the registry (SQLite and
PostgreSQL), `hedgerl train` as a user runs it (bad input, Ctrl-C, resume), a sweep on a two-worker Dask LocalCluster,
and Optuna studies stored in the registry database beside the registry's tables.

PostgreSQL: a fresh database `hedgerl_runs_<random>` on 127.0.0.1 (HEDGERL_TEST_PG_HOST/PORT/USER), as in
test_registry.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import BIN, ROOT, empty_database, fresh_pg_database, run
import hedgerl
from hedgerl.registry import Registry, schema_diff

SCENARIO = "cao2021-gbm-1m-1d"
SMOKE = dict(params={"n_paths": 1000, "hidden": 8}, valid_paths=1000, test_paths=2000)
SMOKE_ARGS = ["--param", "n_paths=1000", "--param", "hidden=8", "--valid-paths", "1000", "--test-paths", "2000"]


@pytest.fixture(scope="module")
def pg_database():
    "A fresh PostgreSQL database for this module (SQLAlchemy URL), dropped at the end."
    with fresh_pg_database("hedgerl_runs", "runs must be tested on PostgreSQL") as u: yield u


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    "An empty database: a SQLite file, or the module's PostgreSQL database with its schema wiped."
    return empty_database(request, tmp_path)


def failing_template(tmp_path: Path) -> Path:
    "The training template with a cell that raises right after training (so a checkpoint and the model exist)."
    nb = json.loads((ROOT / "nbs" / "runs" / "train.ipynb").read_text())
    at = next(i for i, c in enumerate(nb["cells"]) if "hedger.fit(" in "".join(c["source"]))
    nb["cells"].insert(at + 1, {"cell_type": "code", "execution_count": None, "id": "boom", "metadata": {},
                                "outputs": [],
                                "source": ['raise RuntimeError("boom after training")']})
    p = tmp_path / "failing.ipynb"
    p.write_text(json.dumps(nb))
    return p


def check_finished(reg: Registry, r: dict, budget: int):
    folder = Path(r["folder"])
    assert {"train.ipynb", "metrics.json", "model.zip", "checkpoint.zip"} <= {p.name for p in folder.iterdir()}
    metrics = json.loads((folder / "metrics.json").read_text())
    row = reg.runs().set_index("id").loc[r["run_id"]]
    assert row.status == "finished" and row.params["budget"] == budget
    assert row.outputs["test/objective"] == metrics["test/objective"] > 0 and row.outputs["notebook"] == str(
            folder / "train.ipynb")
    models = reg.models()
    assert models[models.run_id == r["run_id"]].artifact.tolist() == [str(folder / "model.zip")]
    ev = reg.evaluations(run_id=r["run_id"])
    assert ev.objective.tolist() == [metrics["test/objective"]] and ev.model_id.tolist() == [metrics["model_id"]]
    assert len(reg.metrics(r["run_id"], key="valid/objective")) >= 1
    executed = json.loads((folder / "train.ipynb").read_text())
    assert any(c.get("outputs") for c in executed["cells"])


def test_train_on_postgresql(pg_database, tmp_path):
    from hedgerl.runs import train
    u = pg_database
    eng = sa.create_engine(u, isolation_level="AUTOCOMMIT")
    with eng.connect() as c: c.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    eng.dispose()
    reg = Registry(u)
    r = train("ntb", SCENARIO, 10, **SMOKE, runs_dir=tmp_path / "runs", registry=reg)
    check_finished(reg, r, 10)
    reg.engine.dispose()


def test_cli_train(tmp_path):
    """`hedgerl train` end to end: a finished run in a folder of its own (bad input:
    test_cli.py::test_no_traceback_reaches_a_user)."""
    u = f"sqlite:///{tmp_path}/registry.sqlite"
    common = ["--registry", u, "--runs-dir", str(tmp_path / "runs")]
    p = run(["hedgerl", "train", "ntb", SCENARIO, "--budget", "10", *SMOKE_ARGS, *common], timeout=180)
    assert p.returncode == 0, p.stderr
    assert "run 1 finished: test objective" in p.stdout
    reg = Registry(u)
    folder = reg.runs().set_index("id").loc[1, "outputs"]["folder"]
    assert Path(folder).parent == tmp_path / "runs" and Path(folder).name.split("-")[2] == "run1" and folder in p.stdout
    check_finished(reg, {"run_id": 1, "folder": folder}, 10)
    reg.engine.dispose()


@pytest.mark.slow
def test_failed_run_keeps_partial_notebook_and_resumes(tmp_path):
    from hedgerl.runs import RunFailed, train
    reg = Registry(f"sqlite:///{tmp_path}/registry.sqlite")
    kw = dict(**SMOKE, runs_dir=tmp_path / "runs", registry=reg)
    with pytest.raises(RunFailed, match="RuntimeError: boom after training") as e:
        train("ntb", SCENARIO, 10, **kw, notebook=failing_template(tmp_path))
    run_id, nb = e.value.run_id, e.value.notebook
    row = reg.runs().set_index("id").loc[run_id]
    assert row.status == "failed" and "boom after training" in row.error and row.outputs["notebook"] == str(nb)
    executed = json.loads(nb.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert [o["evalue"] for o in errors] == ["boom after training"]
    assert (nb.parent / "checkpoint.zip").is_file() and not (nb.parent / "metrics.json").exists()
    # a changed configuration is refused before anything runs; the same one continues from the checkpoint
    with pytest.raises(
            ValueError, match=rf"cannot resume run {run_id}: the configuration changed \(budget: 10 -> 20\)"):
        train(resume=run_id, budget=20, **kw)
    with pytest.raises(ValueError, match=r"configuration changed \(params: .*'hidden': 8.* -> .*'hidden': 16"):
        train(resume=run_id, **{**kw, "params": {"n_paths": 1000, "hidden": 16}})
    r = train(resume=run_id, runs_dir=tmp_path / "runs", registry=reg)
    assert r["status"] == "finished" and r["metrics"]["units"] == 10
    assert reg.runs().set_index("id").loc[r["run_id"], "params"]["resumed_from"] == run_id
    reg.engine.dispose()


@pytest.mark.slow
def test_sweep_two_cells_on_local_cluster(tmp_path):
    from distributed import Client
    from hedgerl.backtest import local_cluster
    from hedgerl.runs import sweep, template_path
    u = f"sqlite:///{tmp_path}/registry.sqlite"
    with Client(local_cluster(n_workers=2, threads_per_worker=1)) as client:
        res = sweep({"notebook": [str(template_path()), str(failing_template(tmp_path))]}, "ntb", SCENARIO, 10,
                    client=client,
                    runs_dir=tmp_path / "runs", registry=u, **SMOKE)
        client.cluster.close()
    assert res.status.tolist() == ["finished", "failed"]
    assert "boom after training" in res.error[1] and res.run_id.notna().all() and res.run_id.nunique() == 2
    reg = Registry(u)
    runs = reg.runs().set_index("id")
    assert runs.loc[res.run_id.astype(int).tolist(), "status"].tolist() == ["finished", "failed"]
    assert (Path(res.folder[1]) / "train.ipynb").is_file()
    reg.engine.dispose()


def test_optuna_study_in_registry_database(url, tmp_path):
    import optuna
    from hedgerl.runs import OPTUNA_VERSION_TABLE, optuna_storage, tune
    reg = Registry(url)
    space = {"lr": (1e-3, 3e-2, "log"), "hidden": [8, 16]}
    t = tune("ntb", SCENARIO, space, n_trials=2, budget=4, params={"n_paths": 500}, valid_paths=500, valid_every=2,
             study="smoke", registry=reg, sampler_seed=0)
    assert t["n_trials"] == 2 and set(t["best_params"]) == {"lr", "hidden"}
    # the registry is untouched by Optuna's tables and migrations
    fresh = Registry(url)
    fresh.check_schema()
    assert fresh.status()["current"] == fresh.status()["head"] and schema_diff(fresh.engine) == []
    with fresh.start_run("after-optuna", {"x": 1}) as r: r.log(0, loss=1.0)
    assert {"alembic_version", OPTUNA_VERSION_TABLE, "studies",
            "trials"} <= set(sa.inspect(fresh.engine).get_table_names())
    # reloaded by name, and resumed by name
    study = optuna.load_study(study_name="smoke", storage=optuna_storage(url))
    assert len(study.trials) == 2 and study.user_attrs["agent"] == "ntb" and study.best_params == t["best_params"]
    t = tune("ntb", SCENARIO, space, n_trials=1, budget=4, params={"n_paths": 500}, valid_paths=500, valid_every=2,
             study="smoke", registry=url)
    assert t["n_trials"] == 3
    p = run(["hedgerl", "db", "status", "--url", url], check=True)
    assert "up_to_date True" in p.stdout
    for r_ in (reg, fresh): r_.engine.dispose()


@pytest.mark.slow
def test_ctrl_c_marks_interrupted_with_a_loadable_checkpoint(tmp_path):
    from hedgerl.agents import load_agent
    u = f"sqlite:///{tmp_path}/registry.sqlite"
    common = ["--registry", u, "--runs-dir", str(tmp_path / "runs")]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "hedgerl"), "train", "ntb", SCENARIO, "--budget", "5000", *SMOKE_ARGS, *common],
                            cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, ckpt = time.time() + 120, None
        while ckpt is None and proc.poll() is None and time.time() < deadline:
            ckpt = next((tmp_path / "runs").glob("*-run1-*/checkpoint.zip"), None); time.sleep(0.2)
        assert ckpt is not None, "no checkpoint within 120 s"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert proc.returncode == 130, err
    assert "run 1 interrupted" in err
    reg = Registry(u)
    row = reg.runs().set_index("id").loc[1]
    assert row.status == "interrupted" and row.outputs["checkpoint"] == str(ckpt)
    agent = load_agent(ckpt, scenario=SCENARIO)
    assert 0 < agent.log.units < 5000
    executed = json.loads((ckpt.parent / "train.ipynb").read_text())
    assert any(o.get("ename") == "KeyboardInterrupt" for c in executed["cells"] for o in c.get("outputs", []))
    p = run(["hedgerl", "train", "--resume", "1", "--budget", "100", *common])
    assert (p.returncode == 2
            and "cannot resume run 1: the configuration changed (budget: 5000 -> 100)" in p.stderr), p.stderr
    assert len(reg.runs()) == 1
    reg.engine.dispose()


EXACT = ["--budget", "120", "--valid-every", "5", "--param", "n_paths=1000", "--param", "hidden=8", "--valid-paths",
         "500",
         "--test-paths", "1000", "--test-seed", "7"]


def _weights(model_zip: Path) -> dict:
    from hedgerl.agents import load_agent
    return {k: v.clone() for k, v in load_agent(model_zip, device="cpu").net.state_dict().items()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    "The uninterrupted run that every interrupted-and-resumed run must reproduce: (weights, metrics)."
    d = tmp_path_factory.mktemp("reference")
    run(["hedgerl", "train", "ntb", SCENARIO, *EXACT, "--registry", f"sqlite:///{d}/r.sqlite", "--runs-dir",
             str(d / "runs")],
            timeout=600, check=True)
    folder = next((d / "runs").glob("*-run1-*"))
    return _weights(folder / "model.zip"), json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_cli_interrupt_then_resume_from_elsewhere_is_exact(sig, reference_run, tmp_path):
    """`hedgerl train` stopped by Ctrl-C, SIGTERM or kill -9 after its first validation, resumed from another
    directory: the same model."""
    url = f"sqlite:///{tmp_path}/r.sqlite"
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "HEDGERL_DATA_FOLDER": str(tmp_path / "data")}
    proc = subprocess.Popen([str(BIN / "hedgerl"), "train", "ntb", SCENARIO, *EXACT, "--registry", url],
                            cwd=tmp_path / "a", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reg = Registry(url)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if reg.status()["tables"].get("run_metrics"): break  # the first validation is logged: training is under way
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), err
    row = reg.runs().set_index("id").loc[1]
    assert row.status == ("failed" if sig == signal.SIGKILL else "interrupted")
    folder = Path(row.outputs["folder"])
    assert folder.parent == tmp_path / "data" / "runs"  # under the data folder, not the working directory
    if sig != signal.SIGKILL:
        # what it learned so far, a line per step; then one line, no traceback
        *progress, last = err.strip().splitlines()
        assert f"run 1 interrupted; its checkpoint is {folder / 'checkpoint.zip'}" in last and all(l.startswith(
                "run 1: ") for l in progress), err
    p = run(["hedgerl", "train", "--resume", "1", "--registry", url],
            env={"HEDGERL_DATA_FOLDER": str(tmp_path / "data")},
            cwd=tmp_path / "b", timeout=600)
    assert p.returncode == 0, p.stderr
    new = reg.runs().set_index("id").loc[2]
    assert (new.status == "finished" and new.params["resumed_from"] == 1
            and Path(new.outputs["folder"]).parent == folder.parent)
    weights, metrics = _weights(Path(new.outputs["folder"]) / "model.zip"), json.loads((Path(new.outputs[
            "folder"]) / "metrics.json").read_text())
    ref_w, ref_m = reference_run
    assert max(float((weights[k] - ref_w[k]).abs().max()) for k in ref_w) <= 1e-12
    assert abs(metrics["test/objective"] - ref_m["test/objective"]) <= 1e-9 * abs(ref_m["test/objective"])
    assert metrics["units"] == ref_m["units"] == 120
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())  # nothing written where it ran
    reg.engine.dispose()


@pytest.mark.slow
def test_held_signals_are_delivered_once():
    """`_HeldSignals` holds a SIGTERM (the handler does not see it), and `release` gives the handler back and delivers
    it there, once; leaving the block delivers nothing more."""
    from hedgerl.runs import _HeldSignals
    got = []
    handler = lambda s, f: got.append(s)  # noqa: E731
    old = signal.signal(signal.SIGTERM, handler)
    try:
        with _HeldSignals() as held:
            signal.raise_signal(signal.SIGTERM)
            assert (got, held.pending) == ([], signal.SIGTERM)
            held.release(); held.release()
            assert got == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_before_training_claims_no_checkpoint(tmp_path):
    """SIGTERM while the notebook still imports: the run is interrupted, and neither the message nor the registry
    claims a checkpoint."""
    url = f"sqlite:///{tmp_path}/r.sqlite"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "hedgerl"), "train", "ntb", SCENARIO, "--budget", "50", *SMOKE_ARGS,
                             "--registry", url,
                             "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "runs").glob(
                "*-run1-*")) and proc.poll() is None and time.time() < deadline: time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert proc.returncode == 130 and ("run 1 interrupted before its first checkpoint (nothing to resume: start it "
                                       "again)") in err, err
    reg = Registry(url)
    row = reg.runs().set_index("id").loc[1]
    assert row.status == "interrupted" and "checkpoint" not in row.outputs and not (Path(row.outputs[
            "folder"]) / "checkpoint.zip").exists()
    p = run(["hedgerl", "train", "--resume", "1", "--registry", url])
    assert p.returncode == 2 and "cannot resume run 1: it left no checkpoint" in p.stderr, p.stderr
    reg.engine.dispose()


def test_papermill_runs_the_training_template_from_its_command_line(tmp_path):
    "The template keeps its kernelspec and `parameters` cell (papermill's own command lists and runs it: it said 'No"
    " kernel name found' before), and `runs.template_path` finds it in the package, as a pip install has it."
    from hedgerl.runs import template_path
    assert (template_path().parent == Path(hedgerl.__file__).resolve().parent / "templates"
            and template_path().samefile(ROOT / "nbs" / "runs" / "train.ipynb"))
    papermill, template = str(Path(sys.executable).parent / "papermill"), str(template_path())
    r = subprocess.run([papermill, "--help-notebook", template], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "budget: Unknown type (default 20)" in r.stdout, r.stdout + r.stderr
    env = {**os.environ, "HEDGERL_DATA_FOLDER": str(tmp_path / "data")}
    r = subprocess.run([papermill, template, str(tmp_path / "out.ipynb"), "-p", "budget", "2", "--cwd", str(tmp_path),
                        "--no-progress-bar"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads((tmp_path / "out.ipynb").read_text())
    assert done["metadata"]["papermill"]["parameters"]["budget"] == 2 and not done["metadata"]["papermill"]["exception"]
