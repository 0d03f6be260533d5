"""The catalog of the hedgerl REST API (`hedgerl.catalog`: scenarios, strategies, runs, models, evaluations, the
leaderboard and its arena) on a real platform started as `make up` starts it (`hedgerl hub up`: proxy, hub, gateway and
service on loopback), called through the hub's proxy with real users' tokens: user A (with a system account, so the
service can read A's model files as A's), user B (no account: never spawns), and the hub's administrator. What A records
goes through the registry's own API with A's token (`RemoteRegistry`), as a workspace would record it.

Every endpoint with a valid call; filters, sorting and pages; B gets 404 for A's private rows and 403 for changing A's
shared ones; the admin reads everything and changes nothing of A's; a model download equals the file's bytes; a
submission of a committed model (reports/models) registered by A is scored on the arena's secret test paths (the
numbers equal the library's own evaluation with that seed) and ranked beside the baselines. Once with the registry on
SQLite (the embedded default), once on PostgreSQL (slow). Accounts made here are named kc*, removed at the end."""
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import fresh_pg_database
from platform_tools import ROOT, Up, admin_login, approved_user, platform_env

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="A's model files are read as A's system account: the platform runs as root"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

API = "/services/hedgerl/api/v1"
SCENARIO = "cao2021-gbm-1m-1d"
MODEL = ROOT / "reports" / "models" / f"{SCENARIO}--ntb.zip"


class Catalog:
    "A running platform, its users' headers, and what A recorded."
    def __init__(self, up: Up, data: Path):
        from hedgerl.platform import HubClient
        self.up, self.data, self.url = up, data, up.url + API
        self.account = f"kc{secrets.token_hex(3)}"  # A: a system account, so that A's files are A's
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", self.account], check=True,
                       capture_output=True)
        self.a, ta = approved_user(up, self.account)
        self.b, tb = approved_user(up)
        admin, pw = admin_login(up)
        hub = HubClient(up.url)
        self.admin, tr = admin, hub.token(hub.login(admin, pw), admin)
        self.tokens = {"a": ta, "b": tb, "root": tr}
        self.h = {k: {"Authorization": f"token {t}"} for k, t in self.tokens.items()}
        self.seen: list[str] = []  # every answer's text: the arena's seed must be in none

    def get(self, who: str, path: str, **kw) -> requests.Response: return self._call("GET", who, path, **kw)
    def post(self, who: str, path: str, **kw) -> requests.Response: return self._call("POST", who, path, **kw)
    def patch(self, who: str, path: str, **kw) -> requests.Response: return self._call("PATCH", who, path, **kw)
    def delete(self, who: str, path: str, **kw) -> requests.Response: return self._call("DELETE", who, path, **kw)

    def _call(self, method, who, path, **kw) -> requests.Response:
        r = requests.request(method, self.url + path, headers=self.h.get(who, {}), timeout=120, **kw)
        self.seen.append(r.text)
        return r

    def registry(self, who: str):
        "The registry through the service as `who` (what a workspace's `open_registry()` is)."
        from hedgerl.remote import RemoteRegistry
        return RemoteRegistry(self.up.url + "/services/hedgerl/", token=self.tokens[who],
                              cache=self.data / f"cache-{who}")

    def close(self):
        self.up.stop()
        subprocess.run(["userdel", "-r", self.account], capture_output=True)


def _seed(p: Catalog) -> dict:
    "A's runs (one shared), A's model file (the committed NTB agent, in A's home, A's) registered privately, B's run."
    ra, rb = p.registry("a"), p.registry("b")
    runs = {}
    for name, agent, shared in (("a-ntb", "ntb", False), ("a-ppo", "ppo", True), ("a-dh", "deep-hedger", False)):
        with ra.start_run("grid", {"agent": agent, "scenario": SCENARIO, "budget": 1}, name=name,
                          shared=shared) as run: run.log(0, **{"train/loss": 1.0})
        runs[name] = run.id
    with rb.start_run("b-exp", {"agent": "ntb", "scenario": "buehler2019-heston"}, name="b-run") as run: pass
    runs["b-run"] = run.id
    home = Path(f"/home/{p.account}")
    (home / "models").mkdir(); f = home / "models" / "ntb.zip"
    shutil.copy(MODEL, f)
    for x in (home / "models", f): shutil.chown(x, p.account, p.account)
    model = ra.register_model(runs["a-ntb"], "ntb", SCENARIO, f, name="a-ntb")
    ev = ra.record_evaluation(SCENARIO, "ntb", 250.0, {"objective_se": 1.0}, n_paths=1000, seed=1, run=runs["a-ntb"],
                              model=model)
    return {"runs": runs, "model": model, "file": f, "evaluation": ev}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def catalog(request, tmp_path_factory):
    data = tmp_path_factory.mktemp("catalog") / "data"
    with (fresh_pg_database("hedgerl_catalog", "the catalog API must be tested with the registry on PostgreSQL")
          if request.param == "postgresql" else _nothing()) as url:
        up = Up(platform_env(data, url), "--no-reference")  # no shared reference rows: the lists below are exact
        try:
            t0 = time.monotonic(); up.wait()
            p = Catalog(up, data)
        except BaseException:
            up.stop(); raise
        try:
            p.known = _seed(p)
            print(f"platform up and seeded in {time.monotonic() - t0:.1f} s ({request.param})")
            yield p
        finally: p.close()


class _nothing:
    def __enter__(self): return None
    def __exit__(self, *exc): return False


def test_callers(catalog):
    p = catalog
    assert p.get("root", "/me").json()["admin"] is True and p.get("a", "/me").json()["admin"] is False
    assert requests.get(p.url + "/scenarios", timeout=30).status_code == 401  # through the proxy, no token


def test_scenarios(catalog):
    p = catalog
    items = p.get("b", "/scenarios").json()["items"]
    from hedgerl.scenarios import names
    assert [s["name"] for s in items] == names()
    one = p.get("b", f"/scenarios/{SCENARIO}").json()
    assert (one["source"], one["horizon"], one["config"]["costs"]["proportional"]) == ("published", 20, 0.01)
    r = p.post("b", "/scenarios/validate", json=one["config"])
    assert r.status_code == 200 and r.json()["config"] == one["config"]
    r = p.post("b", "/scenarios/validate", json={"market": {"model": "gbm", "params": {"mu": 0.0, "sigma": -0.3}}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "market", "params",
            "sigma"] and r.json()["detail"][0]["input"] == -0.3, r.text

    cfg = {"market": {"model": "gbm", "params": {"mu": 0.0, "sigma": 0.3}}, "costs": {"proportional": 0.002}}
    r = p.post("a", "/scenarios", json={"name": "a-vol30", "config": cfg})
    assert r.status_code == 201 and (r.json()["owner"], r.json()["shared"]) == (p.a, False), r.text
    sid = r.json()["id"]
    assert p.get("b", "/scenarios/a-vol30").status_code == 404 and p.get("b", f"/scenarios/{sid}").status_code == 404
    assert "a-vol30" not in [s["name"] for s in p.get("b", "/scenarios?source=saved").json()["items"]]
    assert p.get("root", f"/scenarios/{sid}").json()["owner"] == p.a  # the admin reads A's private scenario
    assert p.patch("b", f"/scenarios/{sid}", json={"shared": True}).status_code == 404
    assert p.patch("a", f"/scenarios/{sid}", json={"shared": True}).json()["shared"] is True
    assert p.get("b", "/scenarios/a-vol30").json()["config"]["market"]["params"]["sigma"] == 0.3
    assert p.patch("b", f"/scenarios/{sid}", json={"shared": False}).status_code == 403
    assert p.delete("root", f"/scenarios/{sid}").status_code == 403
    assert p.post("a", "/scenarios", json={"name": "a-vol30", "config": cfg}).status_code == 409
    s = p.get("a", "/strategies?scenario=a-vol30").json()  # a saved scenario is usable where a scenario is named
    assert {b["name"]: b["applicable"] for b in s["baselines"]}["whalley-wilmott"] is True
    assert p.delete("a", f"/scenarios/{sid}").status_code == 204 and p.get("a", f"/scenarios/{sid}").status_code == 404


def test_strategies(catalog):
    p, m = catalog, catalog.known["model"]
    s = p.get("a", f"/strategies?scenario={SCENARIO}").json()
    from hedgerl.baselines import BASELINES
    assert [b["name"] for b in s["baselines"]] == list(BASELINES)
    delta = next(b for b in s["baselines"] if b["name"] == "delta")
    assert (delta["parameters"][0]["name"] == "vol" and delta["parameters"][0]["default"] is None
            and delta["applicable"] is True)
    assert [x["id"] for x in s["models"]["items"]] == [m["id"]]
    assert p.get("b", f"/strategies?scenario={SCENARIO}").json()["models"]["total"] == 0  # A's model is private


def test_lists_filter_sort_and_page(catalog):
    p = catalog
    r = p.get("a", "/runs").json()
    assert [x["name"] for x in r["items"]] == ["a-dh", "a-ppo", "a-ntb"] and r["total"] == 3  # A's own (B's is private)
    assert [x["name"] for x in p.get("b", "/runs").json()["items"]] == ["b-run", "a-ppo"]  # B's and A's shared one
    assert [x["name"] for x in p.get("root", "/runs?sort=name").json()["items"]] == ["a-dh", "a-ntb", "a-ppo", "b-run"]
    assert [x["name"] for x in p.get("root", f"/runs?scenario={SCENARIO}&agent=ntb").json()["items"]] == ["a-ntb"]
    assert [x["name"] for x in p.get("root", f"/runs?owner={p.a}&sort=-started&status=finished").json()["items"]] == [
            "a-dh", "a-ppo", "a-ntb"]
    page = p.get("root", "/runs?sort=name&limit=2&offset=2").json()
    assert ([x["name"] for x in page["items"]], page["total"], page["limit"], page["offset"]) == (["a-ppo", "b-run"], 4,
            2, 2)
    assert p.get("root", "/runs?experiment=grid&shared=true").json()["total"] == 1
    for bad in ("sort=params", "sort=-secret", "limit=501", "offset=-1", "status=done"):
        r = p.get("a", f"/runs?{bad}"); assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "query", (
                bad, r.text)
    assert p.get("a", "/models?agent=ntb&experiment=grid").json()["items"][0]["id"] == catalog.known["model"]["id"]
    ev = p.get("a", f"/evaluations?scenario={SCENARIO}&strategy=ntb&sort=-objective").json()
    assert [x["id"] for x in ev["items"]] == [catalog.known["evaluation"]] and ev["items"][0]["seed"] == 1


def test_cross_user_access(catalog):
    p, runs, m, ev = catalog, catalog.known["runs"], catalog.known["model"], catalog.known["evaluation"]
    for path in (f"/runs/{runs['a-ntb']}", f"/models/{m['id']}", f"/models/{m['id']}/artifact", f"/evaluations/{ev}"):
        r = p.get("b", path)
        assert r.status_code == 404 and r.json()["detail"].startswith("no "), (path, r.text)
        assert "sqlite" not in r.text and "postgresql" not in r.text  # the database is not named
        assert p.get("root", path).status_code == 200, path  # the admin reads it
    for id_ in (runs["a-ntb"], 999999):  # a private row reads as one that does not exist
        assert p.get("b", f"/runs/{id_}").json() == {"detail": f"no run {id_} visible to user {p.b!r}"}
    assert p.get("b", f"/runs/{runs['a-ppo']}").json()["owner"] == p.a  # shared: readable
    assert p.patch("b", f"/runs/{runs['a-ppo']}", json={"shared": False}).status_code == 403
    assert p.patch("b", f"/runs/{runs['a-ntb']}", json={"shared": True}).status_code == 404
    # the admin changes nothing of A's
    assert p.patch("root", f"/runs/{runs['a-ntb']}", json={"shared": True}).status_code == 403
    for kind, id_ in (("runs", runs["a-ntb"]), ("evaluations", ev)):
        assert p.patch("a", f"/{kind}/{id_}", json={"shared": True}).json()["shared"] is True
        assert p.get("b", f"/{kind}/{id_}").status_code == 200
        assert p.patch("b", f"/{kind}/{id_}", json={"shared": False}).status_code == 403
        assert p.patch("a", f"/{kind}/{id_}", json={"shared": False}).json()["shared"] is False
        assert p.get("b", f"/{kind}/{id_}").status_code == 404


def test_artifact_download(catalog):
    p, m = catalog, catalog.known["model"]
    r = p.get("a", f"/models/{m['id']}/artifact")
    assert r.status_code == 200 and r.content == MODEL.read_bytes() and r.headers["x-checksum-sha256"] == m["checksum"]
    assert p.get("root", f"/models/{m['id']}/artifact").content == MODEL.read_bytes()


def test_leaderboard(catalog):
    p = catalog
    b = p.get("b", f"/leaderboard?scenario={SCENARIO}").json()["scenarios"]
    assert len(b) == 1 and b[0]["scenario"] == SCENARIO
    committed = [e["objective"] for e in b[0]["committed"]]
    assert len(committed) >= 4 and committed == sorted(committed)
    assert {e["strategy"] for e in b[0]["committed"]} >= {"delta", "no-hedge", "ntb"}
    assert p.get("b", "/leaderboard?scenario=nowhere").status_code == 404
    assert len(p.get("a", "/leaderboard").json()["scenarios"]) >= 19


def test_submission_ranks_a_committed_model(catalog):
    p, m = catalog, catalog.known["model"]
    assert p.post("b", "/leaderboard/submissions", json={"model_id": m["id"]}).status_code == 404  # A's private model
    t0 = time.monotonic()
    r = p.post("a", "/leaderboard/submissions", json={"model_id": m["id"]})
    took = time.monotonic() - t0
    assert r.status_code == 201, r.text
    s = r.json()
    from hedgerl.catalog import ARENA_PATHS
    kinds = [e["kind"] for e in s["ranking"]]
    assert (s["new"], s["n_paths"], s["ranked"], kinds.count("model"), kinds.count("baseline")) == (True, ARENA_PATHS,
            5, 1, 4)
    # the NTB agent beats delta and no-hedge
    assert s["ranking"][s["rank"] - 1]["model_id"] == m["id"] and s["rank"] <= 2

    # the arena's numbers are the library's on the service's secret test paths
    seed = int((p.data / "hub" / "secrets" / "arena_seed").read_text().strip(), 16) % 2**63
    from hedgerl.agents import load_agent
    from hedgerl.leaderboard import evaluate_scenario
    lib = evaluate_scenario(SCENARIO, {"delta": "delta", "ntb": load_agent(MODEL, device="cpu")}, n_paths=ARENA_PATHS,
                            seed=seed, n_boot=100)
    assert abs(s["objective"] - lib[1]["objective"]) < 1e-9 and abs(s["improvement_vs_delta_pct"]
                                                                    - lib[1]["improvement_vs_delta_pct"]) < 1e-9
    delta = next(e for e in s["ranking"] if e["strategy"] == "delta")
    assert abs(delta["objective"] - lib[0]["objective"]) < 1e-9  # the baselines on the same paths
    assert all(str(seed) not in t and f"{seed:x}" not in t for t in p.seen)  # the seed is never answered

    # recorded shared, linked to the model, without the seed
    ev = p.get("b", f"/evaluations/{s['evaluation_id']}").json()
    assert (ev["shared"], ev["model_id"], ev["seed"], ev["n_paths"], ev["owner"]) == (True, m["id"], None, ARENA_PATHS,
                                                                                      p.a)
    shared = p.get("b", f"/leaderboard?scenario={SCENARIO}").json()["scenarios"][0]["shared"]
    assert [(e["evaluation_id"], e["arena"]) for e in shared] == [(s["evaluation_id"], True)]

    assert p.patch("a", f"/models/{m['id']}", json={"shared": True}).json()["shared"] is True
    # scored before on this test set: not again
    again = p.post("b", "/leaderboard/submissions", json={"model_id": m["id"]})
    assert (again.status_code == 200 and again.json()["evaluation_id"] == s["evaluation_id"]
            and again.json()["new"] is False)
    print(f"submission scored in {took:.2f} s ({ARENA_PATHS:,} paths, the baselines included)")
