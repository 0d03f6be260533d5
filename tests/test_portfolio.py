"""The portfolio view in the hedgerl service, in headless Chromium (Debian's, driven by Playwright) as a user who logs
in through the hub: the page opens on the book of cao2021-gbm-1m-1d (a short ATM call); a long put is added through the
table and a quantity edited in place; after each change the total value and delta the page shows are those
`hedgerl.portfolio.book_greeks` gives for that book here (and the value is the Black-Scholes value written out with
`bs_price`); a book the library refuses shows its message and cannot be backtested; Backtest draws the risk of the
book (the figures render), and the delta hedge's objective in the page's table is that of
`hedgerl.backtest.backtest` on the same paths; another base (Heston) brings its own book, valued as `book_greeks`
values it; no console error, no request to another host, no failed Panel
callback in the service's log. Screenshots go to tests/artifacts/."""
import os
import re
import secrets
import signal
import time
from pathlib import Path

import pytest

from platform_tools import ROOT, Up, callback_errors, platform_env

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                 reason="the platform runs as root (workspaces are the users' own accounts)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BASE = "cao2021-gbm-1m-1d"
PAGE = "/services/hedgerl/dashboards/portfolio"
ARTIFACTS = Path(os.environ.get("HEDGERL_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    from hedgerl.core import load_settings
    from hedgerl.platform import set_hub_password
    data = tmp_path_factory.mktemp("portfolio") / "data"
    up = Up(platform_env(data))
    try:
        up.wait()
        name, password = f"pf{secrets.token_hex(3)}", secrets.token_urlsafe(12)
        set_hub_password(load_settings(environ=up.env).hub.db_url, name, password)  # approved, as the admin would
        yield up, (name, password)
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


def open_portfolio(browser, up, name, password):
    """A page of a new browser context, logged in through the hub from the portfolio's URL, once the page's session is
    live."""
    page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
    page.seen = {"hosts": set(), "errors": []}
    page.on("request", lambda r: page.seen["hosts"].add(r.url.split("/")[2]))
    page.on("console", lambda m: page.seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.seen["errors"].append(str(e)))
    t0 = time.monotonic()
    page.goto(up.url + PAGE)
    page.fill("input[name=username]", name); page.fill("input[name=password]", password); page.click("#login_submit")
    page.wait_for_url(re.compile(f".*{PAGE}$"), timeout=60_000)  # back from the hub's login
    # live (it said "Connecting" before)
    page.wait_for_selector("text=paths of this book with every strategy that applies", timeout=60_000)
    page.loaded_s = time.monotonic() - t0
    return page


def totals(page) -> dict:
    "The book's total value and delta as the page shows them (each value whole in its `data-value`)."
    return {k: float(page.locator(f"[data-key={k}]").first.get_attribute("data-value")) for k in ("value", "delta")}


def shows_totals(page, want: dict, timeout: float = 30) -> dict:
    """Wait until the page shows the totals `want` (it redraws them after the server's answer); fails with what it
    showed last."""
    t0 = time.monotonic()
    while (now := totals(page)) != want:  # read one by one: a value may be the old one while the new arrives
        assert time.monotonic() - t0 < timeout, f"the page shows {now}, not {want}"
        time.sleep(0.1)
    return now


def expected(book: list[dict]) -> dict:
    """The total value and delta of `book` on the base's market, from the library (and the value once more from
    `bs_price`)."""
    from hedgerl.portfolio import book_config, book_greeks
    from hedgerl.pricing import bs_price
    g = book_greeks(book_config(BASE, book)).loc["total"]
    bs = sum(o["quantity"] * bs_price(100.0, o["strike"], o["maturity"] / 250, 0.0, 0.2, 0.0, o["kind"]) for o in book)
    assert abs(g["value"] - bs) < 1e-12, (g["value"], bs)
    return {"value": float(g["value"]), "delta": float(g["delta"])}


def edit_cell(page, row: int, field: str, text: str) -> None:
    "Edit one cell of the book's table in place, as a user does: click it, type, Enter."
    page.locator(".tabulator-row").nth(row).locator(f".tabulator-cell[tabulator-field={field}]").click()
    editor = page.locator(f".tabulator-cell[tabulator-field={field}] input").first
    editor.fill(text); editor.press("Enter")


def test_a_book_built_in_the_page_is_valued_and_backtested_as_the_library_does(platform, browser):
    from hedgerl.backtest import backtest
    from hedgerl.baselines import DeltaHedge
    from hedgerl.portfolio import book_config
    from hedgerl.scenarios import as_scenario
    up, (name, password) = platform
    page = open_portfolio(browser, up, name, password)
    call = {"kind": "call", "strike": 100.0, "maturity": 20, "quantity": -1.0}
    shows_totals(page, expected([call]), timeout=0)  # the base's own book: a short ATM call
    assert page.locator(".tabulator-row").count() == 1

    page.locator("button", has_text="Add option").click()  # the fields' defaults: a long put at 95, 20 days
    put = {"kind": "put", "strike": 95.0, "maturity": 20, "quantity": 1.0}
    shows_totals(page, expected([call, put]))
    assert page.locator(".tabulator-row").count() == 2

    edit_cell(page, 1, "quantity", "2")  # two puts, edited in the table itself
    put2 = {**put, "quantity": 2.0}
    shown2 = shows_totals(page, expected([call, put2]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "portfolio-book.png"), full_page=True)

    edit_cell(page, 1, "strike", "-5")  # a bad row: the library's message, and no backtest
    page.wait_for_selector("text=This book cannot be hedged: book[1].strike must be positive", timeout=30_000)
    assert page.locator("button", has_text="Backtest").is_disabled()
    edit_cell(page, 1, "strike", "95")
    page.wait_for_selector("text=This book cannot be hedged", state="hidden", timeout=30_000)
    assert totals(page) == shown2

    t_click = time.monotonic()
    page.locator("button", has_text="Backtest").click()
    page.wait_for_selector("text=standard errors from 100 bootstrap replicates", timeout=120_000)
    backtest_s = time.monotonic() - t_click
    t0 = time.monotonic()
    while page.locator("canvas").count() < 4:  # P&L distribution, P&L so far, holding, heatmap
        assert time.monotonic() - t0 < 30, page.locator("canvas").count()
        time.sleep(0.1)
    status = page.locator("text=Backtest of").first.inner_text()
    assert f"Backtest of {BASE} book: 3 strategies on the same 5,000 paths, seed 0" in status, status
    scn = as_scenario(book_config(BASE, [call, put2]))
    ref = backtest(DeltaHedge(), scn, n_paths=5_000, seed=0, chunk_size=5_000).summary(n_boot=100)
    row = page.locator("table.dataframe tbody tr", has=page.locator("th", has_text=re.compile("^delta$"))).first
    cell = row.locator("td").first.inner_text()  # objective: "value ± se"
    assert cell.startswith(f"{ref['objective']:.4g} ±"), (cell, ref["objective"])
    page.screenshot(path=str(ARTIFACTS / "portfolio-backtest.png"), full_page=True)

    # another base: its own book (a short ATM call on Heston)
    page.locator("select").nth(0).select_option("buehler2019-heston")
    heston = {"kind": "call", "strike": 100.0, "maturity": 30, "quantity": -1.0}
    from hedgerl.portfolio import book_greeks
    g = book_greeks(book_config("buehler2019-heston", [heston])).loc["total"]
    shows_totals(page, {"value": float(g["value"]), "delta": float(g["delta"])})
    page.wait_for_selector("text=The book has changed since the backtest below", timeout=30_000)
    assert page.locator(".tabulator-row").count() == 1

    assert page.seen["errors"] == [], page.seen["errors"]
    assert page.seen["hosts"] == {up.url.split("/")[2]}, page.seen["hosts"]  # nothing from another host
    assert callback_errors(up) == []
    page.context.close()
    print(f"portfolio: page {page.loaded_s:.1f} s to show after login; Backtest (3 strategies, 5,000 paths) "
          f"{backtest_s:.1f} s to the results; delta objective {cell}")
