"""The training monitor and the leaderboard page in the hedgerl service, in headless Chromium (Debian's, driven by
Playwright) as users who log in through the hub.

The monitor is watched twice. First a real registry run of user A that a separate Python process logs to while the page
is open (`valid/objective`, `train/objective`, `train/lr` every 0.6 s, as `Agent.fit` logs them at each validation):
deterministic, checked point for point against the registry while it logs. Then a real training started through
`POST api/v1/trainings` with a tiny budget (30 epochs of the no-transaction-band network; 30 to 60 s on this 2-core
machine, most of it the papermill kernel's start), whose points must reach the page while the API says it is running,
equal to `GET trainings/{id}/metrics` and to the TensorBoard event files the page links to.

The leaderboard page is checked against `GET api/v1/leaderboard` (called with A's token), and a click on an entry must
open the evaluation dashboard with that entry's scenario and strategies chosen. Every page: canvases render, no
console error, no request to another host. Screenshots go to tests/artifacts/."""
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import requests

from platform_tools import ROOT, Up, platform_env

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SCENARIO = "cao2021-gbm-1m-1d"
SVC = "/services/hedgerl"
ARTIFACTS = Path(os.environ.get("HEDGERL_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
OPTIONS = ("() => [...Bokeh.documents[0].all_models].filter(m => m.constructor.__qualified__ == 'MultiChoice').map(m "
           "=> [...m.options])")
CHOSEN = ("() => [...Bokeh.documents[0].all_models].filter(m => m.constructor.__qualified__ == 'MultiChoice').map(m => "
          "[...m.value])")
SOURCE = """name => { const m = [...Bokeh.documents[0].all_models].find(m => m.name == name); if (!m) return null;
                      const d = m.data, get = k => Array.from(d instanceof Map ? d.get(k) : d[k]);
                      return {step: get("step"), value: get("value"), id: m.id} }"""
FIGURE = ("title => { const p = [...Bokeh.documents[0].all_models].find(m => m.title && m.title.text == title); return "
          "p ? p.id : null }")
SELECTED = "title => [...Bokeh.documents[0].all_models].find(m => m.title == title && m.options !== undefined).value"

LOGGER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hedgerl.registry import Registry
    url, user, folder, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    reg = Registry(url, user=user)
    config = {"agent": "ntb", "scenario": "%s", "budget": n, "params": {"hidden": 16, "n_paths": 2000}, "seed": 0}
    run = reg.start_run("train", config, name="live")
    (folder / "tensorboard").mkdir(parents=True)
    events = folder / "tensorboard" / "events.out.tfevents.1700000000.test"
    events.write_bytes(b"tensorboard events of run %%d" %% run.id)
    run.set_outputs({"folder": str(folder)})
    print(run.id, flush=True)
    sys.stdin.readline()  # the test says when its page is open
    for s in range(1, n + 1):
        run.log(s, **{"valid/objective": 3.0 / s + 0.01 * (s %% 3), "train/objective": 4.0 / s,
                      "train/lr": 0.01 * 0.9 ** s})
        time.sleep(0.6)
    run.finish({"folder": str(folder)})
""" % SCENARIO)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    from hedgerl.core import load_settings
    from hedgerl.platform import HubClient, set_hub_password
    from hedgerl.registry import Registry
    data = tmp_path_factory.mktemp("monitor") / "data"
    up = Up(platform_env(data))
    try:
        up.wait()
        env = load_settings(environ=up.env)
        users = {k: (f"m{k}{secrets.token_hex(3)}", secrets.token_urlsafe(12)) for k in ("a", "b")}
        # approved, as the admin would
        for name, password in users.values(): set_hub_password(env.hub.db_url, name, password)
        a, b = users["a"][0], users["b"][0]
        reg = Registry(env.registry.url)
        cfg = {"agent": "deep-hedger", "scenario": SCENARIO, "budget": 10, "params": {}, "seed": 0}
        b_private = reg.as_user(b).start_run("train", cfg, name="b-private")  # B's, private
        b_shared = reg.as_user(b).start_run("train", {**cfg, "seed": 1}, name="b-shared", shared=True)
        files = data / "models"; files.mkdir()
        shutil.copy(ROOT / "reports" / "models" / f"{SCENARIO}--ntb.zip", files / "ntb.zip")
        model = reg.as_user(a).register_model(None, "ntb", SCENARIO, files / "ntb.zip", name="a/ntb")  # A's, private
        reg.as_user(a).record_evaluation(SCENARIO, "a/ntb v1", 2.1, {"objective_se": 0.01, "arena": "0123456789abcdef"},
                                         n_paths=20_000,
                                         model=model["id"], shared=True)  # as an arena submission records it
        reg.engine.dispose()
        hub = HubClient(up.url)
        token = hub.token(hub.login(a, users["a"][1]), a)
        yield dict(up=up, users=users, env=env, data=data, b_private=b_private.id, b_shared=b_shared.id, model=model,
                   token=token)
    finally:
        up.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def browser():
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not Path("/usr/bin/chromium").exists():
        if os.environ.get("CI") == "true": pytest.fail("/usr/bin/chromium is missing (make services installs it)")
        pytest.skip("/usr/bin/chromium is missing")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update"])
        yield b
        b.close()


def open_page(browser, up, path, name, password, ready):
    "A page of a new browser context, logged in through the hub from `path`'s URL, once the text `ready` shows."
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.seen = {"hosts": set(), "errors": []}
    page.on("request", lambda r: page.seen["hosts"].add(r.url.split("/")[2]))
    page.on("console", lambda m: page.seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.seen["errors"].append(str(e)))
    page.goto(up.url + path)
    page.fill("input[name=username]", name); page.fill("input[name=password]", password); page.click("#login_submit")
    # back from the hub's login
    page.wait_for_url(re.compile(".*" + re.escape(path.split("?")[0]) + r"(\?.*)?$"), timeout=60_000)
    page.wait_for_selector(f"text={ready}", timeout=120_000)
    return page


def wait_for(what, check, timeout=60.0, every=0.25):
    "Poll `check()` until it gives something true; that value (AssertionError naming `what` after `timeout` s)."
    t0 = time.monotonic()
    while not (v := check()):
        if time.monotonic() - t0 > timeout: raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)
    return v


def clean(page, up):
    """No console error, no request to another host, and no failed Panel callback in the service (those fail in its
    log, not in the browser)."""
    assert page.seen["errors"] == [], page.seen["errors"]
    assert page.seen["hosts"] == {up.url.split("/")[2]}, page.seen["hosts"]  # nothing from another host
    log = (Path(up.env["HEDGERL_DATA_FOLDER"]) / "hub" / "hub.log").read_text()
    assert not [line for line in log.splitlines() if "Exception in callback" in line or "_pending_writes" in line]


def test_the_monitor_streams_a_runs_new_points_while_it_logs(platform, browser):
    from hedgerl.registry import Registry
    up, (a, pw) = platform["up"], platform["users"]["a"]
    folder = platform["data"] / "users" / a / "runs" / "live"  # where the service's own trainings write for A
    n = 40
    logger = subprocess.Popen([sys.executable, "-c", LOGGER, platform["env"].registry.url, a, str(folder), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        run_id = int(logger.stdout.readline())
        page = open_page(browser, up, f"{SVC}/dashboards/training?runs={run_id}", a, pw, "training runs visible to you")
        name = f"run{run_id}:valid/objective"
        assert page.evaluate(SOURCE, name)["value"] == []  # nothing logged yet
        figure = page.evaluate(FIGURE, "Validation objective")
        logger.stdin.write("go\n"); logger.stdin.flush()
        t0 = time.monotonic()
        first = wait_for("a first point", lambda: (d := page.evaluate(SOURCE, name)) and len(d["value"]) >= 2 and d)
        latency = time.monotonic() - t0
        later = wait_for("more points", lambda: (d := page.evaluate(SOURCE,
                                                                    name)) and len(d["value"]) >= len(first["value"])
                                                                    + 3 and d)
        assert logger.poll() is None  # still logging: these points came while the run ran
        # streamed into the same source and figure
        assert later["id"] == first["id"] and page.evaluate(FIGURE, "Validation objective") == figure
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "monitor-running.png"), full_page=True)
        reg = Registry(platform["env"].registry.url).as_user(a)
        truth = reg.metrics(run_id, key="valid/objective")
        k = len(later["value"])
        # what the registry holds, point for point
        assert later["step"] == list(truth.step[:k]) and later["value"] == list(truth.value[:k])
        assert logger.wait(90) == 0
        for key in ("valid/objective", "train/objective", "train/lr"):  # the run ended: every point there, exactly
            truth = reg.metrics(run_id, key=key)
            got = wait_for(f"all of {key}", lambda: (d := page.evaluate(SOURCE,
                                                                        f"run{run_id}:{key}")) and len(d["value"]) == n
                                                                        and d, timeout=30)
            assert got["step"] == list(truth.step) and got["value"] == list(truth.value), key
        page.wait_for_selector("td:has-text('finished')", timeout=30_000)
        assert page.locator("canvas").count() >= 3  # the three charts
        page.screenshot(path=str(ARTIFACTS / "monitor-finished.png"), full_page=True)
        # another user's private run is not on offer; their shared one is
        options = page.evaluate(OPTIONS)[0]
        assert not [o for o in options if f"run {platform['b_private']} " in o or "b-private" in o], options
        assert any(o.startswith(f"run {platform['b_shared']} 'b-shared'") for o in options), options
        # the TensorBoard link gives the run's event files
        href = page.locator(f"a:has-text('TensorBoard logs of run {run_id}')").get_attribute("href")
        r = page.request.get(page.url.split("?")[0].rsplit("/", 1)[0] + "/" + href)
        assert r.status == 200 and r.headers["content-type"] == "application/zip", (r.status, r.text()[:300])
        z = zipfile.ZipFile(io.BytesIO(r.body()))
        assert z.read(f"run{run_id}/events.out.tfevents.1700000000.test") == b"tensorboard events of run %d" % run_id
        bad = page.request.get(f"{up.url}{SVC}/dashboards/training/tensorboard/{platform['b_private']}.zip")
        assert bad.status == 404, bad.text()  # B's private run: as if there were none
        reg.engine.dispose()
        clean(page, up)
        print(f"first points on the page {latency:.1f} s after the logger began; {k} validation points checked while "
              f"it ran")
    finally:
        if logger.poll() is None: logger.kill()


def test_the_monitor_shows_a_real_training_while_it_trains(platform, browser, tmp_path):
    """A tiny training started through `POST api/v1/trainings` (30 to 60 s here): its points arrive on the page while
    the API says it runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    up, (a, pw) = platform["up"], platform["users"]["a"]
    api, h = f"{up.url}{SVC}/api/v1", {"Authorization": f"token {platform['token']}"}
    body = {"agent": "ntb", "scenario": SCENARIO, "budget": 30, "params": {"n_paths": 30_000, "hidden": 16},
            "valid_paths": 1000,
            "valid_every": 1, "test_paths": 2000, "name": "api-tiny"}
    r = requests.post(f"{api}/trainings", json=body, headers=h)
    assert r.status_code == 202, r.text
    run_id, t0 = r.json()["id"], time.monotonic()
    page = open_page(browser, up, f"{SVC}/dashboards/training?runs={run_id}", a, pw, "training runs visible to you")
    name = f"run{run_id}:valid/objective"
    status = lambda: requests.get(f"{api}/trainings/{run_id}", headers=h).json()["status"]
    first = wait_for("the training's first validation on the page", lambda: (d := page.evaluate(SOURCE,
            name)) and len(d["value"]) >= 1 and d, timeout=120)
    seen_first = time.monotonic() - t0
    more = wait_for("a later validation", lambda: (d := page.evaluate(SOURCE,
                                                                      name)) and len(d["value"]) > len(first["value"])
                                                                      and d, timeout=60)
    assert status() == "running", "the page should get its points while the training runs"
    # its folder, recorded when it started
    page.wait_for_selector(f"a:has-text('TensorBoard logs of run {run_id}')", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "monitor-api-training.png"), full_page=True)
    while status() in ("queued", "running"):
        assert time.monotonic() - t0 < 300, "the tiny training did not end within 5 minutes"
        time.sleep(1)
    assert status() == "finished", requests.get(f"{api}/trainings/{run_id}", headers=h).text
    # the REST API: an independent reading
    truth = requests.get(f"{api}/trainings/{run_id}/metrics", headers=h).json()["items"]
    for key in ("valid/objective", "train/objective", "train/lr"):
        want = [(m["step"], m["value"]) for m in truth if m["key"] == key]
        assert len(want) == 30, (key, len(want))
        got = wait_for(f"all of {key}", lambda: (d := page.evaluate(SOURCE,
                                                                    f"run{run_id}:{key}"))
                                                                    and len(d["value"]) == len(want) and d, timeout=30)
        assert list(zip(got["step"], got["value"])) == want, key
    # the TensorBoard link: the event files fit wrote, with the same numbers
    page.wait_for_selector(f"a:has-text('TensorBoard logs of run {run_id}')", timeout=30_000)
    href = page.locator(f"a:has-text('TensorBoard logs of run {run_id}')").get_attribute("href")
    z = page.request.get(page.url.split("?")[0].rsplit("/", 1)[0] + "/" + href)
    assert z.status == 200, z.text()[:300]
    zipfile.ZipFile(io.BytesIO(z.body())).extractall(tmp_path)
    acc = EventAccumulator(str(tmp_path / f"run{run_id}")); acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("valid/objective")]
    want = [(m["step"], m["value"]) for m in truth if m["key"] == "valid/objective"]
    assert [s for s, _ in tb] == [s for s, _ in want] and all(abs(x - y) <= 1e-6 * abs(y) for (_, x), (_, y) in zip(tb,
            want))
    clean(page, up)
    print(f"API training {run_id}: first point on the page {seen_first:.1f} s after the POST, {len(more['value'])} "
          f"while running; "
          f"ended after {time.monotonic() - t0:.1f} s")


def test_another_users_private_run_is_not_offered(platform, browser):
    up, (b, pw) = platform["up"], platform["users"]["b"]
    page = open_page(browser, up, f"{SVC}/dashboards/training", b, pw, "training runs visible to you")
    options = page.evaluate(OPTIONS)[0]
    # B's own private run: offered to B
    assert any(o.startswith(f"run {platform['b_private']} ") for o in options), options
    assert not any("live" in o for o in options), options  # A's private run is not
    clean(page, up)


def test_the_leaderboard_is_the_apis_and_links_to_the_evaluation_dashboard(platform, browser):
    up, (a, pw) = platform["up"], platform["users"]["a"]
    page = open_page(browser, up, f"{SVC}/dashboards/leaderboard", a, pw, "committed leaderboard")
    assert page.locator("canvas").count() >= 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "leaderboard.png"), full_page=True)
    api = requests.get(f"{up.url}{SVC}/api/v1/leaderboard", params={"scenario": SCENARIO},
                       headers={"Authorization": f"token {platform['token']}"})
    assert api.status_code == 200, api.text
    board = api.json()["scenarios"][0]
    rows = page.locator("table.hedgerl-board tbody tr")
    shown = [[rows.nth(i).locator("td").nth(j).inner_text().strip() for j in (0, 2, 4)] for i in range(rows.count())]
    fmt = lambda e: f"{e['objective']:.4g}" + ("" if e.get("objective_se") is None else f" ± {e['objective_se']:.4g}")
    expected = [["leaderboard", e["strategy"], fmt(e)] for e in board["committed"]] + \
               [["arena" if e["arena"] else "shared", e["strategy"], fmt(e)] for e in board["shared"]]
    assert shown == expected  # the API's entries, in its order, with its numbers
    model = platform["model"]
    assert page.locator("a.hedgerl-entry:has-text('a/ntb v1')").get_attribute("href").endswith(
        f"strategies=delta&strategies=a%2Fntb+v1+%28model+{model['id']}%29")  # A's own model: evaluated in one click
    # another scenario, then a click on one of its entries
    page.locator("select").first.select_option("cao2021-gbm-1m-2d")
    page.wait_for_selector("a.hedgerl-entry[href*='scenario=cao2021-gbm-1m-2d&']", timeout=30_000)
    page.locator("a.hedgerl-entry:text-is('whalley-wilmott')").click()
    page.wait_for_url(re.compile(
            r".*/dashboards/evaluation\?scenario=cao2021-gbm-1m-2d&strategies=delta&strategies=whalley-wilmott$"),
            timeout=30_000)
    page.wait_for_selector("text=bootstrap replicates", timeout=180_000)  # evaluated
    assert page.evaluate(SELECTED, "Scenario") == "cao2021-gbm-1m-2d"
    assert page.evaluate(CHOSEN)[0] == ["delta", "whalley-wilmott"]
    assert page.locator("text=/cao2021-gbm-1m-2d: [0-9,]+ paths/").count() >= 1
    assert page.locator("canvas").count() >= 4
    page.screenshot(path=str(ARTIFACTS / "leaderboard-to-evaluation.png"), full_page=True)
    clean(page, up)
