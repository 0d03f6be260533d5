"""The Voila evaluation dashboard in a real workspace, in headless Chromium (Debian's, through Playwright): a user logs
in through the hub, starts a workspace, and opens the seeded notebook at /user/<name>/voila/render/hedgerl/evaluation.ipynb.
It evaluates and draws every figure; changing a widget calls back into the kernel (ipywidgets comms) and redraws; the
page logs no console error and asks no host but the platform's (no CDN: Panel's stylesheets inline, no MathJax, no
Font Awesome: see hedgerl.dashboards.notebook_extension and hub/workspace/). Screenshot in tests/artifacts/."""
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
def workspace_user(tmp_path_factory):
    from hedgerl.core import load_settings
    from hedgerl.platform import set_hub_password
    up = Up(platform_env(tmp_path_factory.mktemp("voila") / "data"))
    name, password = f"v{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    try:
        up.wait()
        set_hub_password(load_settings(environ=up.env).hub.db_url, name, password)  # approved, as the admin would
        yield up, name, password
    finally:
        up.stop(signal.SIGTERM)
        subprocess.run(["pkill", "-u", name], capture_output=True); subprocess.run(["userdel", "-r", name], capture_output=True)


def test_the_voila_dashboard_renders_offline_and_calls_back(workspace_user, browser):  # noqa: F811
    up, name, password = workspace_user
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(up.url + "/hub/login"); page.fill("input[name=username]", name); page.fill("input[name=password]", password)
    page.click("#login_submit"); page.wait_for_url("**/hub/**")
    page.goto(up.url + f"/hub/spawn/{name}"); page.wait_for_url(re.compile(f".*/user/{name}/lab.*"), timeout=180_000)
    hosts, errors = set(), []
    page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    t0 = time.monotonic()
    page.goto(up.url + f"/user/{name}/voila/render/hedgerl/evaluation.ipynb", timeout=300_000)
    page.wait_for_selector("text=bootstrap replicates", timeout=300_000)  # evaluated in the user's kernel
    page.wait_for_function("() => document.readyState == 'complete'")
    deadline = time.monotonic() + 60
    while page.locator("canvas").count() < 4 and time.monotonic() < deadline: page.wait_for_timeout(200)
    print(f"Voila: evaluated and drawn {time.monotonic() - t0:.1f} s after asking for the page")
    assert page.locator("canvas").count() >= 4
    assert page.locator("text=Trades of no-hedge on sample path 0").count() == 1
    page.locator("select:not([multiple])").nth(1).select_option("delta")  # "Headline and heatmap for": back to the kernel
    page.wait_for_selector("text=Trades of delta on sample path 0", timeout=60_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "voila-evaluation.png"), full_page=True)
    assert errors == [], errors
    assert hosts == {up.url.split("/")[2]}, hosts  # nothing from another host
