"""The evaluation dashboard in the hedgerl service, in headless Chromium (Debian's, driven by Playwright) as users who
log in through the hub: the page goes through the hub's login and back, evaluates, and renders every figure (canvases);
changing a widget redraws; no console error and no request to another host; a user's private model is offered to
them and to nobody else. Screenshots go to tests/artifacts/ (kept by CI as artifacts)."""
import os
import re
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from platform_tools import ROOT, Up, callback_errors, platform_env

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SCENARIO = "cao2021-gbm-1m-1d"
PAGE = "/services/hedgerl/dashboards/evaluation"
ARTIFACTS = Path(os.environ.get("HEDGERL_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
OPTIONS = ("() => [...Bokeh.documents[0].all_models].filter(m => m.constructor.__qualified__ == 'MultiChoice').map(m "
           "=> m.options)")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    from hedgerl.core import load_settings
    from hedgerl.platform import set_hub_password
    from hedgerl.registry import Registry
    data = tmp_path_factory.mktemp("dashboards") / "data"
    up = Up(platform_env(data))
    try:
        up.wait()
        db = load_settings(environ=up.env).hub.db_url
        users = {k: (f"d{k}{secrets.token_hex(3)}", secrets.token_urlsafe(12)) for k in ("a", "b")}
        for name, password in users.values(): set_hub_password(db, name, password)  # approved, as the admin would
        files = data / "models"; files.mkdir()
        shutil.copy(ROOT / "reports" / "models" / f"{SCENARIO}--ntb.zip", files / "ntb.zip")
        reg = Registry(load_settings(environ=up.env).registry.url).as_user(users["a"][0])
        # the experiment that made it
        with reg.start_run("a-sweep", {"agent": "ntb", "scenario": SCENARIO}) as run: pass
        model = reg.register_model(run, "ntb", SCENARIO, files / "ntb.zip", name="a/ntb")  # A's, private
        reg.engine.dispose()
        yield up, users, f"a/ntb v1 (model {model['id']})"
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


def open_dashboard(browser, up, name, password):
    """A page of a new browser context, logged in through the hub from the dashboard's URL, once its first evaluation
    shows."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.seen = {"hosts": set(), "errors": []}
    page.on("request", lambda r: page.seen["hosts"].add(r.url.split("/")[2]))
    page.on("console", lambda m: page.seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.seen["errors"].append(str(e)))
    t0 = time.monotonic()
    page.goto(up.url + PAGE)
    page.fill("input[name=username]", name); page.fill("input[name=password]", password); page.click("#login_submit")
    page.wait_for_url(re.compile(f".*{PAGE}$"), timeout=60_000)  # back from the hub's login
    page.wait_for_selector("text=bootstrap replicates", timeout=180_000)  # the first evaluation is shown
    page.loaded_s = time.monotonic() - t0
    return page


def test_the_evaluation_dashboard_renders_and_redraws(platform, browser):
    up, users, model = platform
    page = open_dashboard(browser, up, *users["a"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "evaluation.png"), full_page=True)
    assert page.locator("canvas").count() >= 4  # the four figures
    assert page.locator("text=Trades of no-hedge on sample path 0").count() == 1  # the first that is not delta
    page.get_by_label("Headline and heatmap for").select_option("delta")
    page.wait_for_selector("text=Trades of delta on sample path 0", timeout=30_000)
    assert page.locator("canvas").count() >= 4
    page.screenshot(path=str(ARTIFACTS / "evaluation-delta.png"), full_page=True)
    assert model in page.evaluate(OPTIONS)[0]  # A's own model is offered to A
    # another evaluation, from the button (its work runs in a thread; the page changes after an await, under the lock)
    page.evaluate("() => { [...Bokeh.documents[0].all_models].find(m => m.constructor.__qualified__ == "
                  "'MultiChoice').value = ['delta', 'no-hedge'] }")
    page.get_by_role("button", name="Evaluate").click()
    focus, deadline = page.get_by_label("Headline and heatmap for"), time.monotonic() + 120
    while focus.locator("option").count() != 2 and time.monotonic() < deadline: page.wait_for_timeout(200)
    assert focus.locator("option").all_text_contents() == ["delta", "no-hedge"]  # the new evaluation's strategies
    page.wait_for_selector("text=bootstrap replicates", timeout=120_000)
    assert page.locator("canvas").count() >= 4 and callback_errors(up) == []
    assert page.seen["errors"] == [], page.seen["errors"]
    assert page.seen["hosts"] == {up.url.split("/")[2]}, page.seen["hosts"]  # nothing from another host


def test_another_users_private_model_is_not_offered(platform, browser):
    up, users, model = platform
    page = open_dashboard(browser, up, *users["b"])
    options = page.evaluate(OPTIONS)[0]
    assert "delta" in options and model not in options and not any("a/ntb" in o for o in options), options



def test_an_experiment_in_the_url_opens_its_models_beside_delta(platform, browser):
    """?experiment=NAME chooses the experiment: its models' scenario and its models beside delta; nobody else is
    offered it."""
    up, users, model = platform
    value = ("() => [...Bokeh.documents[0].all_models].filter(m => m.constructor.__qualified__ == 'MultiChoice').map(m "
             "=> m.value)")
    for k, expected in (("a", ["delta", model]), ("b", None)):
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.goto(up.url + PAGE + "?experiment=a-sweep")
        page.fill("input[name=username]", users[k][0]); page.fill("input[name=password]",
                                                                  users[k][1]); page.click("#login_submit")
        page.wait_for_url(re.compile(f".*{PAGE}\\?experiment=a-sweep$"), timeout=60_000)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=60_000)
        chosen = page.evaluate(value)[0]
        if expected is not None: assert chosen == expected, chosen
        else: assert model not in chosen and not any("a-sweep" in v
                                                     for v in page.locator("select").evaluate_all(
                "ss => ss.flatMap(s => [...s.options].map(o => o.value))")), chosen
        page.context.close()


def test_the_service_keeps_an_idle_proxy_connection_open(platform):
    "The hub's proxy keeps idle connections to the service and reuses them: the service must not close one after a few"
    " seconds (a request racing uvicorn's 5 s close got a 503 'socket hang up', and a page lost bokeh-widgets.min.js)."
    up = platform[0]
    req = b"GET /services/hedgerl/api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", int(up.env["HEDGERL_SERVICE_PORT"])), timeout=30) as s:
        s.sendall(req); first = _read_response(s)
        time.sleep(7)
        s.sendall(req); second = _read_response(s)
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200"), (first[:40], second[:40])


def _read_response(s):
    "One whole HTTP/1.1 response from socket `s`: headers, then `content-length` bytes of body (TCP may split them)."
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk: raise AssertionError(f"connection closed after {data[:80]!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                  if k.strip().lower() == b"content-length")
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk: raise AssertionError(f"connection closed inside the body of {head[:40]!r}")
        body += chunk
    return head + b"\r\n\r\n" + body
