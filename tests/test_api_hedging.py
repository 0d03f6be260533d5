"""`hedge` and `simulations` of the REST API on a real platform (`hedgerl hub up` on loopback: proxy, hub, gateway and
the hedgerl service), called through the hub's proxy with real users' tokens: the holdings `hedge` answers for the
states of a recorded backtest are the backtest's (delta, a fixed band, a committed learned model registered by a user),
a simulation stepped to the end has the backtest's P&L on its path, another user gets 404 for a private model and for an
episode (an admin may read the episode), and the limits: states per call, open simulations per user, idle expiry
(a short HEDGERL_SERVICE_SIMULATION_IDLE). Once more on PostgreSQL (slow)."""
import os
import secrets
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from platform_tools import ROOT, Up, admin_login, approved_user, platform_env

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

API = "/services/hedgerl/api/v1"
SCENARIO = "cao2021-gbm-1m-1d"
MODELS = ROOT / "reports" / "models"
IDLE = 4  # seconds before an idle simulation expires, on this platform
LIMITS = {"HEDGERL_SERVICE_MAX_STATES": "3000", "HEDGERL_SERVICE_MAX_SIMULATIONS": "2",
          "HEDGERL_SERVICE_SIMULATION_IDLE": str(IDLE)}


def _platform(data: Path, registry_url: str | None):
    from hedgerl.core import load_settings
    from hedgerl.platform import HubClient
    from hedgerl.registry import Registry
    up = Up(platform_env(data, registry_url, **LIMITS))
    try:
        up.wait()
        users = {k: approved_user(up, f"h{k}{secrets.token_hex(3)}") for k in ("a", "b", "c")}
        admin, password = admin_login(up)
        hub = HubClient(up.url)
        users["admin"] = (admin, hub.token(hub.login(admin, password), admin))
        # A's models, registered in the service's registry as A (A has no system account to register them through the
        # service, which reads a file as its owner's): the committed NTB network private, the committed PPO agent shared
        files = data / "models"; files.mkdir()
        for kind in ("ntb", "ppo"): shutil.copy(MODELS / f"{SCENARIO}--{kind}.zip", files / f"{kind}.zip")
        reg = Registry(load_settings(environ=up.env).registry.url).as_user(users["a"][0])
        ntb = reg.register_model(None, "ntb", SCENARIO, files / "ntb.zip", name="a/ntb")["id"]
        ppo = reg.register_model(None, "ppo", SCENARIO, files / "ppo.zip", name="a/ppo", shared=True)["id"]
        reg.engine.dispose()
        return up, SimpleNamespace(up=up, url=up.url + API, users=users, ntb=ntb, ppo=ppo, files=files)
    except BaseException:
        up.stop(); raise


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def platform(request, tmp_path_factory):
    if request.param == "postgresql":
        from conftest import fresh_pg_database
        with fresh_pg_database("hedgerl_api_hedging", "the service's registry on PostgreSQL") as url:
            up, p = _platform(tmp_path_factory.mktemp("hedging-pg") / "data", url)
            try: yield p
            finally: up.stop()
    else:
        up, p = _platform(tmp_path_factory.mktemp("hedging") / "data", None)
        try: yield p
        finally: up.stop()


def call(p, method: str, path: str, who: str | None = "a", **kw) -> requests.Response:
    headers = {"Authorization": f"token {p.users[who][1]}"} if who else {}
    return requests.request(method, f"{p.url}/{path}", headers=headers, timeout=120, **kw)


def backtest_states(strategy, n_paths: int = 100, seed: int = 3):
    "A recorded backtest and every state it hedged (its paths again from its seed, stepped with its recorded holdings)."
    from hedgerl.backtest import backtest
    from hedgerl.core import spawn_seeds
    from hedgerl.scenarios import Rollout, get, simulate_scenario
    res = backtest(strategy, SCENARIO, n_paths=n_paths, seed=seed)
    ro = Rollout(simulate_scenario(get(SCENARIO), n_paths, seed=spawn_seeds(seed, 1)[0]))
    cols = {k: [] for k in ("spot", "tau", "holdings", "hedge_pnl", "cost")}
    while not ro.done:
        o = ro.observe()
        for k, v in (("spot", o.spot), ("tau", np.full(n_paths, o.tau)), ("holdings", o.holdings[:, 0]), ("hedge_pnl",
                o.hedge_pnl), ("cost", o.cost)):
            cols[k].append(v)
        ro.step(res.holdings[:, ro.j])
    np.testing.assert_array_equal(ro.pnl, res.pnl)
    return res, {k: np.concatenate(v).tolist() for k, v in cols.items()}


def test_hedge_gives_the_backtests_holdings(platform):
    from hedgerl.agents import load_agent
    from hedgerl.baselines import DeltaHedge, FixedBand
    cases = [("delta", DeltaHedge()), ({"baseline": "fixed-band", "params": {"width": 0.06}}, FixedBand(0.06)),
             ({"model": platform.ntb}, load_agent(platform.files / "ntb.zip"))]
    for spec, strategy in cases:
        res, states = backtest_states(strategy)
        r = call(platform, "POST", "hedge", json={"strategy": spec, "scenario": SCENARIO, "states": states})
        assert r.status_code == 200, r.text
        got = r.json()
        want = res.holdings.transpose(1, 0, 2).reshape(-1, 1)  # date-major, as the states
        np.testing.assert_allclose(np.array(got["holdings"]), want, rtol=0, atol=1e-12)
        assert got["instruments"] == ["underlying"] and len(got["delta"]) == len(want) and got["day"][-1] == 19
    assert got["strategy"] == f"a/ntb v1 (ntb, model {platform.ntb})"


def test_hedge_sees_what_the_caller_may_and_keeps_the_limit(platform):
    from hedgerl.hedging import hedge_states, load_strategy_file, market_states
    from hedgerl.scenarios import get
    states = {"spot": [95.0, 100.0, 105.0], "tau": 0.04, "holdings": [0.3, 0.5, 0.7], "hedge_pnl": 0.1, "cost": 0.02}
    r = call(platform, "POST", "hedge", "b", json={"strategy": {"model": platform.ntb}, "states": states})
    assert (r.status_code, r.json()["detail"]) == (404, f"strategy.model: no model {platform.ntb} visible to user "
                                                   f"'{platform.users['b'][0]}'")
    # shared: B may
    r = call(platform, "POST", "hedge", "b", json={"strategy": {"model": platform.ppo}, "states": states})
    assert r.status_code == 200, r.text
    ppo = load_strategy_file(platform.files / "ppo.zip"); ppo.reset(get(SCENARIO))
    np.testing.assert_array_equal(np.array(r.json()["holdings"]), hedge_states(ppo, market_states(get(SCENARIO),
            **states))[0])
    # an admin sees all
    r = call(platform, "POST", "hedge", "admin", json={"strategy": {"model": platform.ntb}, "states": states})
    assert r.status_code == 200, r.text
    ntb = load_strategy_file(platform.files / "ntb.zip"); ntb.reset(get(SCENARIO))
    np.testing.assert_array_equal(np.array(r.json()["holdings"]), hedge_states(ntb, market_states(get(SCENARIO),
            **states))[0])
    assert call(platform, "POST", "hedge", None, json={"strategy": "delta", "scenario": SCENARIO,
                                                       "states": states}).status_code == 401
    r = call(platform, "POST", "hedge", json={"strategy": "delta", "scenario": SCENARIO,
                                              "states": {"spot": [100.0] * 3001, "tau": 0.08}})
    assert (r.status_code == 429 and r.headers["Retry-After"] == "1"
            and "limit is 3000 a call ([service] max_states)" in r.json()["detail"])
    r = call(platform, "POST", "hedge", json={"strategy": "delta", "scenario": SCENARIO, "states": {"spot": [100.0],
            "tau": 0.05}})
    assert r.status_code == 422 and r.json()["detail"].startswith("states.tau[0] = 0.05 is not a hedging date of "
                                                                  "scenario"), r.text


def test_a_stepped_simulation_ends_with_the_backtests_pnl(platform):
    from hedgerl.agents import load_agent
    from hedgerl.backtest import backtest
    from hedgerl.baselines import DeltaHedge
    a, b = platform.users["a"][0], platform.users["b"][0]
    wants = {"delta": float(backtest(DeltaHedge(), SCENARIO, n_paths=2, seed=77).pnl[0]),
             "model": float(backtest(load_agent(platform.files / "ntb.zip"), SCENARIO, n_paths=2, seed=77).pnl[0])}
    for key, spec in (("delta", "delta"), ("model", {"model": platform.ntb})):
        r = call(platform, "POST", "simulations", json={"strategy": spec, "scenario": SCENARIO, "seed": 77})
        assert r.status_code == 201, r.text
        sim = r.json()
        assert (r.headers["Location"] == f"{API}/simulations/{sim['id']}" and sim["owner"] == a
                and sim["state"]["step"] == 0)
        for j in range(sim["n_steps"]):
            r = call(platform, "POST", f"simulations/{sim['id']}/step")
            assert r.status_code == 200 and r.json()["step"]["step"] == j, r.text
        full = call(platform, "GET", f"simulations/{sim['id']}").json()
        assert full["state"]["done"] and len(full["history"]) == 20 and full["history"][-1]["pnl"] == full["state"][
                "pnl"]
        assert abs(full["state"]["pnl"] - wants[key]) <= (0 if key == "delta" else 1e-12), (full["state"]["pnl"],
                wants[key])
        # B: 404 everywhere, as for an episode that does not exist; the admin may read it, not step or delete it
        for method, path in (("GET", ""), ("POST", "/step"), ("DELETE", "")):
            r = call(platform, method, f"simulations/{sim['id']}{path}", "b")
            assert (r.status_code, r.json()["detail"]) == (404,
                                                           f"no simulation {sim['id']} of user '{b}' (expired after "
                                                           f"{IDLE} s idle, deleted, or never created)")
        assert call(platform, "GET", f"simulations/{sim['id']}", "admin").json()["owner"] == a
        assert call(platform, "POST", f"simulations/{sim['id']}/step", "admin").status_code == 404
        assert call(platform, "POST", f"simulations/{sim['id']}/step").status_code == 409  # finished
        assert call(platform, "DELETE", f"simulations/{sim['id']}").status_code == 204
        assert call(platform, "GET", f"simulations/{sim['id']}").status_code == 404
    # B's own episode, stepped by B with holdings of B's choosing
    r = call(platform, "POST", "simulations", "b", json={"strategy": {"model": platform.ppo}, "seed": 5})
    assert r.status_code == 201 and r.json()["scenario"] == SCENARIO, r.text
    r = call(platform, "POST", f"simulations/{r.json()['id']}/step", "b", json={"holdings": [0.4]})
    assert r.json()["step"]["chosen_by"] == "caller" and r.json()["state"]["holdings"] == [0.4]
    r = call(platform, "POST", "simulations", "b", json={"strategy": {"model": platform.ntb}, "seed": 5})
    assert r.status_code == 404  # A's private model


def test_simulations_per_user_and_idle_expiry(platform):
    new = lambda: call(platform, "POST", "simulations", "c", json={"strategy": "delta", "scenario": SCENARIO})
    first, second = new(), new()
    assert first.status_code == second.status_code == 201
    r = new()
    assert (r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= IDLE
            and "has 2 simulations open" in r.json()["detail"]), r.text
    assert [s["id"] for s in call(platform, "GET", "simulations", "c").json()] == [first.json()["id"],
                                                                                   second.json()["id"]]
    time.sleep(IDLE + 1.5)  # idle: the service's sweep removes both
    assert call(platform, "GET", f"simulations/{first.json()['id']}", "c").status_code == 404
    assert call(platform, "GET", "simulations", "c").json() == []
    assert new().status_code == 201


def test_a_saved_scenario_is_used_by_name_and_stays_private(platform):
    """A's saved scenario (the published one at 30% vol) hedges and simulates by its name for A (delta at its vol), a
    backtest of it records its config; B gets the same 422 as for a mistyped name until A shares it."""
    from hedgerl.scenarios import get
    name = f"a-vol30-{secrets.token_hex(2)}"
    cfg = get(SCENARIO).to_dict(); cfg["market"]["params"]["sigma"] = 0.3
    r = call(platform, "POST", "scenarios", json={"name": name, "config": cfg})
    assert r.status_code == 201, r.text
    states = {"spot": [95.0, 100.0, 105.0], "tau": 0.04, "holdings": [0.5, 0.5, 0.5], "hedge_pnl": 0.0, "cost": 0.0}
    r = call(platform, "POST", "hedge", json={"strategy": "delta", "scenario": name, "states": states})
    assert r.status_code == 200, r.text
    assert r.json()["scenario"] == name
    from hedgerl.baselines import DeltaHedge
    from hedgerl.hedging import hedge_states, market_states
    from hedgerl.scenarios import as_scenario
    mine = as_scenario({**cfg, "name": name}); d = DeltaHedge(); d.reset(mine)
    want = hedge_states(d, market_states(mine, **{k: np.broadcast_to(np.asarray(v), 3) for k, v in states.items()}))[0]
    np.testing.assert_allclose(np.array(r.json()["holdings"]), want, rtol=0, atol=1e-12)  # delta at the saved 30% vol
    r20 = np.array(call(platform, "POST", "hedge", json={"strategy": "delta", "scenario": SCENARIO,
                                                         "states": states}).json()["holdings"])
    assert np.abs(r20 - want).max() > 1e-3  # not the published scenario's 20%
    r = call(platform, "POST", "simulations", json={"scenario": name, "strategy": "delta", "seed": 1})
    assert r.status_code == 201 and r.json()["scenario"] == name, r.text
    call(platform, "DELETE", f"simulations/{r.json()['id']}")
    r = call(platform, "POST", "backtests", json={"scenario": name, "strategy": "delta", "n_paths": 200, "seed": 1})
    assert r.status_code == 202, r.text
    run = call(platform, "GET", f"runs/{r.json()['id']}").json()
    assert run["params"]["scenario"] == name and run["params"]["scenario_config"]["market"]["params"]["sigma"] == 0.3
    for path, body in (("hedge", {"strategy": "delta", "scenario": name, "states": states}),
                       ("simulations", {"scenario": name, "strategy": "delta"}),
                       ("backtests", {"scenario": name, "strategy": "delta", "n_paths": 200})):
        r = call(platform, "POST", path, who="b", json=body)
        assert r.status_code == 422 and f"unknown scenario {name!r}" in r.text, (path, r.text)
    sid = call(platform, "GET", f"scenarios/{name}").json()["id"]
    assert call(platform, "PATCH", f"scenarios/{sid}", json={"shared": True}).status_code == 200
    assert call(platform, "POST", "hedge", who="b", json={"strategy": "delta", "scenario": name,
                                                          "states": states}).status_code == 200
