"""The simulation player in the hedgerl service, in headless Chromium (Debian's, driven by Playwright) as a user who
logs in through the hub: choose delta on cao2021-gbm-1m-1d, start an episode, step it and play it briefly; the numbers
the page shows (spot, holdings, delta and P&L of the last step, and the table's rows) are those that
`GET api/v1/simulations/{id}` answers that user (an independent reading of the same episode); the page's figures
render (canvases); no console error and no request to another host; another user cannot read the episode. Screenshots
go to tests/artifacts/."""
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path

import pytest

from platform_tools import ROOT, Up, callback_errors, platform_env

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SCENARIO = "cao2021-gbm-1m-1d"
PAGE = "/services/hedgerl/dashboards/player"
ARTIFACTS = Path(os.environ.get("HEDGERL_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
STEPPED = re.compile(r"(\d+) of (\d+) hedging dates stepped")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    from hedgerl.core import load_settings
    from hedgerl.platform import HubClient, set_hub_password
    data = tmp_path_factory.mktemp("player") / "data"
    up = Up(platform_env(data))
    try:
        up.wait()
        db, hub = load_settings(environ=up.env).hub.db_url, HubClient(up.url)
        users = {}
        for k in ("a", "b"):
            name, password = f"p{k}{secrets.token_hex(3)}", secrets.token_urlsafe(12)
            set_hub_password(db, name, password)  # approved, as the admin would
            # the form login puts them in `researchers`
            users[k] = (name, password, hub.token(hub.login(name, password), name))
        from hedgerl.registry import Registry
        files = data / "models"; files.mkdir()
        shutil.copy(ROOT / "reports" / "models" / "cao2021-gbm-1m-1d--ntb.zip", files / "ntb.zip")
        reg = Registry(load_settings(environ=up.env).registry.url).as_user(users["a"][0])
        # A's, private
        reg.register_model(None, "ntb", "cao2021-gbm-1m-1d", files / "ntb.zip", name="a/ntb"); reg.engine.dispose()
        yield up, users
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


def open_player(browser, up, name, password):
    "A page of a new browser context, logged in through the hub from the player's URL, once the player shows."
    page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
    page.seen = {"hosts": set(), "errors": []}
    page.on("request", lambda r: page.seen["hosts"].add(r.url.split("/")[2]))
    page.on("console", lambda m: page.seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.seen["errors"].append(str(e)))
    t0 = time.monotonic()
    page.goto(up.url + PAGE)
    page.fill("input[name=username]", name); page.fill("input[name=password]", password); page.click("#login_submit")
    page.wait_for_url(re.compile(f".*{PAGE}$"), timeout=60_000)  # back from the hub's login
    # the page's session is live (it said "Connecting" before)
    page.wait_for_selector("text=then New episode", timeout=60_000)
    page.loaded_s = time.monotonic() - t0
    return page


def stepped(page) -> int:
    "The hedging dates stepped, as the page's status line says."
    return int(STEPPED.search(page.locator("text=hedging dates stepped").first.inner_text())[1])


def shown(page) -> dict:
    "The last step's numbers as the page shows them (each value whole in its `data-value`)."
    return {k: float(page.locator(f"[data-key={k}]").first.get_attribute("data-value")) for k in ("spot", "holdings",
            "delta", "pnl")}


def table_rows(page) -> int:
    return page.locator("table.dataframe tbody tr").count()


def test_the_player_steps_and_plays_with_the_apis_numbers(platform, browser):
    from hedgerl.client import HedgerlClient, NotFound
    up, users = platform
    name, password, token = users["a"]
    api = HedgerlClient(up.url, token)
    page = open_player(browser, up, name, password)
    page.locator("select").nth(0).select_option(SCENARIO)
    page.locator("select").nth(1).select_option("delta")
    page.locator("button", has_text="New episode").click()
    page.wait_for_selector("text=0 of 20 hedging dates stepped", timeout=30_000)
    sid = page.locator("[data-key=id]").first.inner_text().strip()
    assert re.fullmatch(r"[0-9a-f]{16}", sid), sid
    t0 = time.monotonic()
    for k in range(1, 5):  # Step, four times: each shows the API's step
        page.locator("button", has_text="Step").click()
        page.wait_for_selector(f"text={k} of 20 hedging dates stepped", timeout=30_000)
        sim = api.simulation(sid)
        last = sim["history"][-1]
        assert (len(sim["history"]), sim["owner"], sim["strategy"], sim["scenario"]) == (k, name, "delta", SCENARIO)
        assert shown(page) == {"spot": last["spot"], "holdings": last["holdings"][0], "delta": last["delta"],
                               "pnl": last["pnl"]}
        assert last["holdings"][0] == last["delta"]  # delta hedges to delta
    step_s = (time.monotonic() - t0) / 4
    assert table_rows(page) == 4
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "player-steps.png"), full_page=True)

    page.locator("button", has_text="Play").click()  # 2 steps a second
    page.wait_for_selector("button:has-text('Pause')", timeout=10_000)
    time.sleep(1.6)
    page.locator("button", has_text="Pause").click()
    page.wait_for_selector("button:has-text('Play')", timeout=10_000)
    time.sleep(0.5)  # a step on its way when paused lands
    k = stepped(page)
    sim = api.simulation(sid)
    last = sim["history"][-1]
    assert 4 < k < 20 and len(sim["history"]) == k, (k, len(sim["history"]))
    assert shown(page) == {"spot": last["spot"], "holdings": last["holdings"][0], "delta": last["delta"],
                           "pnl": last["pnl"]}
    assert table_rows(page) == k
    assert page.locator("canvas").count() >= 3  # the three figures
    page.screenshot(path=str(ARTIFACTS / "player-played.png"), full_page=True)
    assert page.seen["errors"] == [], page.seen["errors"]
    assert page.seen["hosts"] == {up.url.split("/")[2]}, page.seen["hosts"]  # nothing from another host
    assert callback_errors(up) == []
    with pytest.raises(NotFound):  # another user cannot read the episode
        HedgerlClient(up.url, users["b"][2]).simulation(sid)
    page.context.close()
    print(f"player: page {page.loaded_s:.1f} s to show after login, {step_s * 1000:.0f} ms from a click on Step to the "
          f"new numbers; {k} steps after play")


def test_a_finished_episode_says_so_in_the_page(platform, browser):
    up, users = platform
    name, password, token = users["b"]
    page = open_player(browser, up, name, password)
    page.locator("select").nth(1).select_option("no-hedge")
    page.locator("button", has_text="New episode").click()
    page.wait_for_selector("text=0 of 20 hedging dates stepped", timeout=30_000)
    for _ in range(20): page.locator("button", has_text="Step").click(); time.sleep(0.05)
    page.wait_for_selector("text=finished: all dates stepped", timeout=30_000)
    page.locator("button", has_text="Step").click()
    page.wait_for_selector("text=is finished: all 20 hedging dates have been stepped", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "player-finished.png"), full_page=True)
    # the delta episode beside, on the same path: the user's other open episode; the page's delta numbers are its
    from hedgerl.client import HedgerlClient
    api = HedgerlClient(up.url, token)
    sid = page.locator("[data-key=id]").first.inner_text().strip()
    mine = {e["strategy"]: api.simulation(e["id"]) for e in api.get("simulations")}
    assert sorted(mine) == ["delta", "no-hedge"] and mine["no-hedge"]["id"] == sid, sorted(mine)
    assert mine["delta"]["seed"] == mine["no-hedge"]["seed"] and mine["delta"]["state"]["done"]
    assert [r["holdings"][0] for r in mine["delta"]["history"]] == [r["delta"] for r in mine["no-hedge"]["history"]]
    last = page.locator("table.dataframe tbody tr").last.locator("td")
    cells = [last.nth(i).inner_text() for i in range(last.count())]
    # delta cost, delta pnl (rounded to 6)
    assert cells[-2:] == [f"{mine['delta']['history'][-1][k]:.6f}" for k in ("cost", "pnl")], cells
    assert f"delta <b>{mine['delta']['state']['pnl']:+.4f}</b>" in page.locator("text=P&L so far:").first.inner_html()
    assert page.seen["errors"] == [], page.seen["errors"]
    assert callback_errors(up) == []
    page.context.close()


def test_the_player_in_a_workspace_drives_the_api_through_the_hub(platform):
    "What the Voila notebook does: the same `Player` on a `HedgerlClient` (HTTP through the hub with the user's token)."
    from hedgerl.client import HedgerlClient
    from hedgerl.player import Player, strategy_refs
    up, users = platform
    client = HedgerlClient(up.url, users["a"][2])
    p = Player(client, lambda s: strategy_refs(s, client))
    sid = p.start(seed=11, strategy="whalley-wilmott")
    assert sid is not None, p.message
    for _ in range(3): assert p.step(), p.message
    sim = client.simulation(sid)
    assert p.rows == sim["history"] and len(p.rows) == 3 and sim["strategy"] == "whalley-wilmott"
    # delta beside, on the same path
    assert [r["holdings"][0] for r in client.simulation(p.delta_sim["id"])["history"]] == [r["delta"] for r in p.rows]
    assert p.frame["delta pnl"].tolist() == [r["pnl"] for r in p.delta_rows]
    p.close()
    assert sid not in set(client.simulations().get("id", []))  # its episodes end with it


def test_a_private_model_is_offered_to_its_owner_only(platform, browser):
    "A's private model is in A's strategy selector and in nobody else's (B sees the baselines)."
    up, users = platform
    offered = {}
    for k in ("a", "b"):
        page = open_player(browser, up, *users[k][:2])
        offered[k] = page.locator("select").nth(1).locator("option").all_text_contents()  # Scenario, then Strategy
        page.context.close()
    assert any("a/ntb" in o for o in offered["a"]) and "delta" in offered["a"], offered
    assert "delta" in offered["b"] and not any("a/ntb" in o for o in offered["b"]), offered
