"""`hedgerl.client.HedgerlClient` end to end on a real platform (`hedgerl hub up` on loopback: proxy, hub, gateway,
service), through the hub's proxy with real users' tokens: every resource of the REST API at smoke sizes, the error
classes a caller meets (401, 403, 404, 409, 422, 429 with Retry-After), and what user B may not see of user A's.
User A gets a system account (removed at the end) so that the model file she registers is hers, as on the platform.
HEDGERL_TEST_API_REGISTRY=postgresql runs the same tests with the service's registry on a fresh PostgreSQL database."""
import os
import secrets
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from hedgerl.client import Conflict, Forbidden, HedgerlClient, Invalid, NotFound, TooMany, Unauthorized
from platform_tools import ROOT, Up, admin_login, approved_user, platform_env

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SCENARIO = "cao2021-gbm-1m-1d"
MODEL = ROOT / "reports" / "models" / "cao2021-gbm-1m-1d--ntb.zip"


class Users:
    def __init__(self, up, a, ta, b, tb, admin, tadmin):
        self.up, self.a, self.b, self.admin_name = up, a, b, admin
        self.A, self.B = HedgerlClient(up.url, token=ta), HedgerlClient(up.url, token=tb)
        self.admin = HedgerlClient(up.url, token=tadmin)
        self.ta = ta


@pytest.fixture(scope="module")
def registry_url():
    """None (SQLite in the platform's data folder), or a fresh PostgreSQL database under
    HEDGERL_TEST_API_REGISTRY=postgresql."""
    if os.environ.get("HEDGERL_TEST_API_REGISTRY", "sqlite") != "postgresql": yield None; return
    from conftest import fresh_pg_database
    with fresh_pg_database("hedgerl_client", "HEDGERL_TEST_API_REGISTRY=postgresql asks for it") as url: yield url


@pytest.fixture(scope="module")
def users(tmp_path_factory, registry_url):
    env = platform_env(tmp_path_factory.mktemp("client") / "data", registry_url, HEDGERL_SERVICE_MAX_SIMULATIONS="2")
    up = Up(env)
    a = f"cl{secrets.token_hex(3)}"
    try:
        up.wait()
        from hedgerl.platform import HubClient
        a, ta = approved_user(up, a)
        b, tb = approved_user(up)
        admin, pw = admin_login(up)
        hub = HubClient(up.url)
        yield Users(up, a, ta, b, tb, admin, hub.token(hub.login(admin, pw), admin))
    finally:
        up.stop()
        subprocess.run(["userdel", "-r", a], capture_output=True)


@pytest.fixture(scope="module")
def a_model(users, tmp_path_factory):
    "A learned model registered by A: the committed agent, copied into a file that A's system account owns."
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", users.a], check=True,
                   capture_output=True)
    d = tmp_path_factory.mktemp("models"); os.chmod(d, 0o755)
    f = d / MODEL.name
    shutil.copy(MODEL, f); shutil.chown(f, users.a)
    from hedgerl.core import load_settings
    from hedgerl.registry import Registry
    reg = Registry(load_settings(environ=users.up.env).registry.url).as_user(users.a)
    with reg.start_run("client-test", params={"scenario": SCENARIO, "agent": "ntb"}) as run: run.log(1,
            **{"train/loss": 0.25})
    m = reg.register_model(run, "ntb", SCENARIO, f)
    ev = reg.record_evaluation(SCENARIO, "ntb", 230.0, {"mean": -0.1}, n_paths=100, seed=1, run=run, model=m)
    reg.engine.dispose()
    return {"run": run.id, "model": m["id"], "evaluation": ev, "file": f}


def test_service_and_errors(users):
    assert HedgerlClient(users.up.url, token="").health()["status"] == "ok"  # no token needed
    assert users.A.me() == {"name": users.a, "groups": ["researchers"], "admin": False}
    assert users.admin.me()["admin"] is True
    with pytest.raises(Unauthorized, match="HTTP 401"): HedgerlClient(users.up.url, token="not-a-token").me()
    from hedgerl.platform import HubClient
    hub = HubClient(users.up.url)
    admin, pw = admin_login(users.up)
    # without the service's scope
    narrow = hub.token(hub.login(admin, pw), admin, scopes=[f"read:users:name!user={admin}"])
    with pytest.raises(Forbidden, match="may not use the hedgerl service"): HedgerlClient(users.up.url,
                                                                                          token=narrow).me()
    with pytest.raises(Forbidden): users.A.metrics()  # needs read:metrics


def test_scenarios_and_strategies(users):
    A, B = users.A, users.B
    sc = A.scenarios(source="published")
    assert SCENARIO in sc.name.tolist() and len(sc) >= 5
    cfg = A.scenario(SCENARIO)["config"]
    assert A.validate_scenario(cfg)["config"] == cfg
    with pytest.raises(Invalid) as e: A.validate_scenario({**cfg, "n_steps": "many"})
    assert e.value.status == 422 and e.value.detail
    saved = A.save_scenario("client-gbm", {**cfg, "description": "A's"})
    with pytest.raises(NotFound): B.scenario(saved["id"])
    with pytest.raises(Conflict): A.save_scenario("client-gbm", cfg)  # the name is taken
    A.share_scenario(saved["id"])
    assert B.scenario(saved["id"])["owner"] == users.a
    with pytest.raises(Forbidden): B.delete_scenario(saved["id"])
    A.delete_scenario(saved["id"])
    with pytest.raises(NotFound): A.scenario(saved["id"])
    st = A.strategies(SCENARIO)
    assert {"delta", "fixed-band"} <= set(st["baselines"].name), st["baselines"]


def test_backtest_job_equals_the_library(users):
    A, B = users.A, users.B
    job = A.submit_backtest(SCENARIO, "delta", n_paths=2000, seed=7, n_boot=10)
    assert job["status"] in ("queued", "running", "finished")
    done = A.wait_backtest(job["id"], timeout=180)
    assert done["status"] == "finished", done
    from hedgerl.backtest import backtest
    from hedgerl.baselines import make_baseline
    lib = backtest(make_baseline("delta"), SCENARIO, n_paths=2000, seed=7, progress=False).summary(n_boot=0)
    assert done["summary"]["mean"] == pytest.approx(float(lib["mean"]), rel=0, abs=1e-12)
    assert done["summary"]["objective_se"] > 0
    with pytest.raises(NotFound): B.backtest(job["id"])
    with pytest.raises(Conflict): A.cancel_backtest(job["id"])
    assert job["id"] in A.backtests().id.tolist() and job["id"] not in B.backtests().id.tolist()
    assert users.admin.backtest(job["id"])["owner"] == users.a  # an admin reads everyone's
    # a job cancelled while it runs ends interrupted
    big = A.submit_backtest(SCENARIO, "delta", n_paths=400_000, seed=1, n_boot=0)
    A.cancel_backtest(big["id"])
    assert A.wait_backtest(big["id"], timeout=60)["status"] == "interrupted"


def test_registry_listings_sharing_and_download(users, a_model, tmp_path):
    A, B, admin = users.A, users.B, users.admin
    runs = A.runs(experiment="client-test")
    assert runs.id.tolist() == [a_model["run"]] and runs.attrs["total"] == 1
    assert str(runs.started.dtype).startswith("datetime64")
    with pytest.raises(NotFound): B.run(a_model["run"])
    assert admin.run(a_model["run"])["owner"] == users.a
    A.share_run(a_model["run"]); assert B.run(a_model["run"])["shared"] is True
    with pytest.raises(Forbidden): B.share_run(a_model["run"], False)
    with pytest.raises(NotFound): B.model(a_model["model"])
    assert a_model["model"] not in B.models().id.tolist()
    A.share_model(a_model["model"])
    assert a_model["model"] in B.models(scenario=SCENARIO, algorithm="ntb").id.tolist()
    p = A.download_model(a_model["model"], tmp_path)
    assert p.name == MODEL.name and p.read_bytes() == MODEL.read_bytes()
    ev = A.evaluations(model_id=a_model["model"])
    assert ev.id.tolist() == [a_model["evaluation"]]
    with pytest.raises(NotFound): B.evaluation(a_model["evaluation"])
    A.share_evaluation(a_model["evaluation"]); assert B.evaluation(a_model["evaluation"])["strategy"] == "ntb"
    all_runs = A.runs(pages=True, limit=1)
    assert len(all_runs) == all_runs.attrs["total"] >= 2  # the backtest jobs are runs too (if they ran first)
    with pytest.raises(Invalid): A.runs(sort="password")


def test_leaderboard_and_a_submission(users, a_model):
    A = users.A
    lb = A.leaderboard(SCENARIO)
    assert set(lb.scenario) == {SCENARIO} and "delta" in lb.strategy.tolist()
    sub = A.submit_to_leaderboard(a_model["model"])
    assert sub["model_id"] == a_model["model"] and 1 <= sub["rank"] <= sub["ranked"] and sub["new"] is True
    assert any(r["kind"] == "baseline" and r["strategy"] == "delta" for r in sub["ranking"])
    again = A.submit_to_leaderboard(a_model["model"])  # the same paths: the same score, not scored again
    assert again["new"] is False and again["objective"] == sub["objective"]
    with pytest.raises(NotFound): users.B.submit_to_leaderboard(a_model["model"] + 1000)


def test_hedge_and_simulations(users, a_model):
    A, B = users.A, users.B
    states = pd.DataFrame({"spot": [95.0, 100.0, 105.0], "tau": [10 / 250] * 3})
    h = A.hedge("delta", states, scenario=SCENARIO)
    np.testing.assert_allclose(h.underlying, h.delta)
    learned = A.hedge(a_model["model"], {**states.to_dict("list"), "holdings": [0.5, 0.5, 0.5]})
    assert len(learned) == 3 and learned.attrs["strategy"].startswith("ntb")
    A.share_model(a_model["model"], False)  # (another test shares it)
    with pytest.raises(NotFound): B.hedge(a_model["model"], states)
    sim = A.create_simulation("delta", SCENARIO, seed=4)
    first = A.step_simulation(sim["id"])
    assert first["step"]["chosen_by"] == "strategy"
    over = A.step_simulation(sim["id"], holdings=0.25)
    assert over["step"]["chosen_by"] == "caller" and over["step"]["holdings"] == [0.25]
    assert len(A.simulation(sim["id"])["history"]) == 2
    with pytest.raises(NotFound): B.simulation(sim["id"])
    second = A.create_simulation("delta", SCENARIO, seed=5)
    with pytest.raises(TooMany) as e: A.create_simulation("delta", SCENARIO, seed=6)  # [service] max_simulations = 2
    assert e.value.retry_after is not None and e.value.retry_after >= 0
    A.delete_simulation(sim["id"]); A.delete_simulation(second["id"])
    assert A.simulations().empty


def test_a_training_streams_its_metrics(users):
    A = users.A
    job = A.submit_training("ntb", SCENARIO, 2, params={"n_paths": 500}, test_paths=500, valid_paths=200, seed=1)
    t0, events = time.monotonic(), []
    for ev in A.stream_training(job["id"]):
        events.append(ev)
        assert time.monotonic() - t0 < 600
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "finished", events[-3:]
    steps = [e["data"]["step"] for e in events if e["event"] == "metrics"]
    assert steps == sorted(steps) and steps, events
    done = A.training(job["id"])
    assert done["status"] == "finished" and done["notebook"], done
    m = A.training_metrics(job["id"])
    assert set(m.step) >= set(steps) and m.attrs["status"] == "finished"
    assert A.training_metrics(job["id"], after=max(steps)).empty
    assert job["id"] in A.runs(experiment="trainings").id.tolist()
