"""The Voila dashboards in a real workspace, in headless Chromium (Debian's, through Playwright): a user logs in
through the hub, starts a workspace, and opens the seeded notebooks at /user/<name>/voila/render/hedgerl/<file>.
The evaluation evaluates and draws every figure, and a widget change calls back into the kernel (ipywidgets comms)
and redraws; the player steps an episode through the service's `simulations` API with the user's token. Neither page
logs a console error or asks a host but the platform's (no CDN: Panel's stylesheets inline, no MathJax, no Font
Awesome: see hedgerl.dashboards.notebook_extension and hub/workspace/). Screenshots in tests/artifacts/."""
import os
import re
import secrets
import signal
import subprocess
import time

import pytest

from platform_tools import Up, platform_env
from test_dashboards import ARTIFACTS, browser  # noqa: F401 (the module's Chromium fixture)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
        reason="workspaces run as the users' own accounts (root spawns them)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, browser):  # noqa: F811
    "A browser context of a user logged in through the hub whose workspace is running; (platform, name, context)."
    from hedgerl.core import load_settings
    from hedgerl.platform import set_hub_password
    up = Up(platform_env(tmp_path_factory.mktemp("voila") / "data"))
    name, password = f"v{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    try:
        up.wait()
        set_hub_password(load_settings(environ=up.env).hub.db_url, name, password)  # approved, as the admin would
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.goto(up.url + "/hub/login"); page.fill("input[name=username]", name); page.fill("input[name=password]",
                password)
        page.click("#login_submit"); page.wait_for_url("**/hub/**")
        page.goto(up.url + f"/hub/spawn/{name}"); page.wait_for_url(re.compile(f".*/user/{name}/lab.*"),
                                                                    timeout=180_000)
        page.close()
        yield up, name, context
        context.close()
    finally:
        up.stop(signal.SIGTERM)
        subprocess.run(["pkill", "-u", name], capture_output=True); subprocess.run(["userdel", "-r", name],
                                                                                   capture_output=True)


def voila_page(workspace, notebook: str):
    "A new page on the seeded `notebook` in Voila, recording the hosts it asks and its console errors."
    up, name, context = workspace
    page = context.new_page()
    page.seen = {"hosts": set(), "errors": [], "elsewhere": set()}
    local = up.url.split("/")[2]
    page.on("request", lambda r: (page.seen["hosts"].add(r.url.split("/")[2]),
                                  r.url.split("/")[2] == local or page.seen["elsewhere"].add(r.url)))
    page.on("console", lambda m: page.seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.seen["errors"].append(str(e)))
    page.goto(up.url + f"/user/{name}/voila/render/hedgerl/{notebook}", timeout=300_000)
    return page


def wait_canvases(page, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while page.locator("canvas").count() < n and time.monotonic() < deadline: page.wait_for_timeout(200)
    return page.locator("canvas").count()


def test_the_voila_evaluation_renders_offline_and_calls_back(workspace):
    up = workspace[0]
    t0 = time.monotonic()
    page = voila_page(workspace, "evaluation.ipynb")
    page.wait_for_selector("text=bootstrap replicates", timeout=300_000)  # evaluated in the user's kernel
    page.wait_for_function("() => document.readyState == 'complete'")
    assert wait_canvases(page, 4) >= 4
    print(f"Voila evaluation: evaluated and drawn {time.monotonic() - t0:.1f} s after asking for the page")
    assert page.locator("text=Trades of no-hedge on sample path 0").count() == 1
    page.get_by_label("Headline and heatmap for").select_option("delta")  # back to the kernel
    page.wait_for_selector("text=Trades of delta on sample path 0", timeout=60_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "voila-evaluation.png"), full_page=True)
    assert page.seen["hosts"] == {up.url.split("/")[2]}, sorted(page.seen["elsewhere"])  # nothing from another host
    assert page.seen["errors"] == [], page.seen["errors"]


def test_the_voila_player_steps_through_the_service(workspace):
    up = workspace[0]
    page = voila_page(workspace, "player.ipynb")
    # the kernel reached the service with the user's token
    page.wait_for_selector("text=then New episode", timeout=300_000)
    page.locator("button", has_text="New episode").click()
    page.wait_for_selector("text=0 of 20 hedging dates stepped", timeout=60_000)
    for k in (1, 2, 3):
        page.locator("button", has_text="Step").click()
        page.wait_for_selector(f"text={k} of 20 hedging dates stepped", timeout=60_000)
    assert wait_canvases(page, 3) >= 3
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "voila-player.png"), full_page=True)
    assert page.seen["hosts"] == {up.url.split("/")[2]}, sorted(page.seen["elsewhere"])
    assert page.seen["errors"] == [], page.seen["errors"]
