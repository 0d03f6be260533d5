"""`hedgerl report` end to end: the CLI writes a scenario's and the leaderboard's HTML and PDF (the PDF opens, with its
headings, figures and numbers); the HTML asks no other host for anything when Chromium opens it; every failure is one
line; the templates ship in the wheel; and through the real hub a user gets their run's report while another user
gets a 404. Smoke sizes (2,000 paths): minutes, not more."""
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from platform_tools import ROOT, Up, approved_user, platform_env

HEDGERL = Path(sys.executable).parent / "hedgerl"
SCENARIO = "cao2021-gbm-1m-1d"
CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FIGURES = ("Figure 1: terminal P&L", "Figure 2: P&L along a path", "Figure 3: hedge ratio against delta",
           "Figure 4: holding minus delta")


def need_chromium():
    if not Path("/usr/bin/chromium").exists():
        if CI: pytest.fail("/usr/bin/chromium is missing (make services installs it)")
        pytest.skip("/usr/bin/chromium is missing")


def cli(*args, env=None, timeout=600):
    return subprocess.run([str(HEDGERL), "report", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def pdf_text(path):
    from pypdf import PdfReader
    pages = PdfReader(str(path)).pages
    return pages, [" ".join(p.extract_text().split()) for p in pages]


@pytest.fixture(scope="module")
def scenario_report(tmp_path_factory):
    "`hedgerl report SCENARIO` on 2,000 paths, as a user runs it."
    need_chromium()
    out = tmp_path_factory.mktemp("reports")
    t0 = time.monotonic()
    r = cli(SCENARIO, "--n-paths", "2000", "--seed", "5", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    return out, r, time.monotonic() - t0


def test_the_cli_writes_html_and_pdf_with_the_reports_numbers(scenario_report):
    out, r, seconds = scenario_report
    slug = f"scenario-{SCENARIO}"
    for step in ("executing report.ipynb", "HTML ", "printing the PDF", "PDF "):
        assert f"report {slug}: {step}" in r.stderr, r.stderr  # progress while it runs
    assert {p.name for p in out.iterdir()} == {f"{slug}.html", f"{slug}.pdf", f"{slug}.json"}
    numbers = json.loads((out / f"{slug}.json").read_text())
    assert numbers["n_paths"] == 2000 and numbers["seed"] == 5 and list(numbers["table"]) == ["delta", "no-hedge",
            "whalley-wilmott"]
    pages, text = pdf_text(out / f"{slug}.pdf")
    everything = " ".join(text)
    assert 2 <= len(pages) <= 6, len(pages)
    best = min((k for k in numbers["table"] if k != "delta"), key=lambda k: numbers["table"][k]["objective"])
    # the cards, heatmap and trades are about the best strategy but delta
    assert numbers["focus"] == best == "whalley-wilmott"
    assert f"Hedging report: {SCENARIO}" in text[0] and f"Headline: {best}" in text[0] and "Comparison" in everything
    for heading in (*FIGURES, f"Trades of {best} on sample path 0"):
        assert heading in everything, heading
    for label, row in numbers["table"].items():  # the table in the PDF is the report's numbers
        assert f"{row['objective']:.4g} ± {row['objective_se']:.2g}" in everything, (label, row["objective"])
    # each figure is drawn on canvases, which Chromium prints as images: at least one per figure, on the pages of its
    # heading
    with_figures = [i for i, t in enumerate(text) if any(f in t for f in FIGURES)]
    assert sum(len(pages[i].images) for i in with_figures) >= 4
    assert all(len(pages[i].images) >= 1 for i in with_figures)
    from hedgerl.reports import pdf_pages
    assert pdf_pages(out / f"{slug}.pdf") == len(pages)
    print(f"scenario report: {seconds:.1f} s, {len(pages)} pages, {sum(len(p.images) for p in pages)} images")


def test_the_html_asks_no_other_host_and_draws_every_figure(scenario_report):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out, _, _ = scenario_report
    html = out / f"scenario-{SCENARIO}.html"
    seen, errors = [], []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update"])
        page = b.new_page()
        page.on("request", lambda r: seen.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(html.as_uri())
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length == 4 && Bokeh.documents.every(d => "
                               "d.is_idle)", timeout=60_000)
        canvases = page.locator("canvas").count()  # Playwright's CSS locators pierce Bokeh's shadow roots
        b.close()
    assert [u for u in seen if not u.startswith(("file:", "data:", "blob:"))] == []
    assert errors == []
    assert canvases >= 4


def test_without_playwright_chromium_prints_on_its_own(scenario_report, tmp_path):
    "The fallback when Playwright is not installed: Chromium's --print-to-pdf, the figures given virtual time to draw."
    from hedgerl.reports import _print_to_pdf, pdf_pages
    out, _, _ = scenario_report
    pdf = _print_to_pdf("/usr/bin/chromium", out / f"scenario-{SCENARIO}.html", tmp_path / "plain.pdf", timeout=120)
    pages, text = pdf_text(pdf)
    assert pdf_pages(pdf) == len(pages) >= 2 and all(f in " ".join(text) for f in FIGURES)
    assert sum(len(p.images) for p in pages) >= 4


def test_the_leaderboard_report(tmp_path):
    need_chromium()
    r = cli("leaderboard", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    records = json.loads((ROOT / "reports" / "leaderboard.json").read_text())
    pages, text = pdf_text(tmp_path / "leaderboard-report.pdf")
    everything = " ".join(text)
    scenarios = list(dict.fromkeys(x["scenario"] for x in records))
    assert len(pages) >= len(scenarios) // 4
    assert "hedgerl leaderboard" in text[0]
    for i, s in enumerate(scenarios, 1):
        assert f"Figure {i}: {s}" in everything and f"Table: {s}" in everything
    best = min((x for x in records if x["scenario"] == SCENARIO), key=lambda x: x["objective"])
    assert f"| {best['strategy']} |" not in everything  # rendered as a table, not Markdown source
    assert f"{best['objective']:.4g} ± {best['objective_se']:.2g}" in everything
    assert sum(len(p.images) for p in pages) >= len(scenarios)


def test_failures_are_one_line_with_the_fix(tmp_path):
    r = cli("cao2021", "--out-dir", str(tmp_path), "--registry", f"sqlite:///{tmp_path}/r.sqlite")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "'cao2021' is no published scenario (hedgerl scenarios), scenario file, run id or experiment" in r.stderr
    r = cli("7", "--out-dir", str(tmp_path), "--registry", f"sqlite:///{tmp_path}/r.sqlite")
    assert r.returncode == 2 and "no run 7 visible to user" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    t0 = time.monotonic()
    r = cli(SCENARIO, "--out-dir", str(tmp_path), env={**os.environ, "HEDGERL_CHROMIUM": "/nowhere/chromium"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "Chromium '/nowhere/chromium' is not an executable file" in r.stderr and "--no-pdf" in r.stderr
    assert time.monotonic() - t0 < 30 and not any(tmp_path.glob("*.html"))  # refused before the long part
    r = cli(SCENARIO, "--out-dir", str(tmp_path), "--n-paths", "1")
    assert r.returncode == 2 and "n_paths" in r.stderr, r.stderr


def test_the_templates_ship_in_the_wheel(tmp_path):
    """A wheel built from this tree carries the templates, and an installed hedgerl finds them in its own folder, not
    in a clone."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if f.startswith(("hedgerl/", "nbs/runs/")) or f in ("pyproject.toml", "README.md", "LICENSE"):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / f).is_symlink(): (src / f).symlink_to(os.readlink(ROOT / f))
            elif (ROOT / f).is_file(): shutil.copy2(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("hedgerl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"hedgerl/templates/report.ipynb", "hedgerl/templates/leaderboard_report.ipynb",
            "hedgerl/templates/train.ipynb"} <= set(names)
    # the wheel carries the licence
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), [n for n in names if "dist-info" in n]
    zipfile.ZipFile(wheel).extractall(site := tmp_path / "site")
    assert not (site / "hedgerl" / "templates").is_symlink()
    r = subprocess.run([sys.executable, "-c", "import hedgerl.reports as r, json; p = r.template_path(); "
                        "print(p); print(json.loads(p.read_text())['metadata']['kernelspec']['name'])"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    path, kernel = r.stdout.split()
    assert Path(path) == site / "hedgerl" / "templates" / "report.ipynb" and kernel == "python3"


def test_papermill_runs_the_template_from_its_command_line(tmp_path):
    """The templates keep their kernelspec and `parameters` cell: papermill's own command runs them and lists their
    parameters."""
    papermill, template = str(Path(sys.executable).parent / "papermill"), str(ROOT / "nbs" / "runs" / "report.ipynb")
    r = subprocess.run([papermill, "--help-notebook", template], capture_output=True, text=True, timeout=120)
    assert (r.returncode == 0 and "n_paths: Unknown type (default 2000)" in r.stdout
            and "test paths" in r.stdout), r.stdout + r.stderr
    r = subprocess.run([papermill, template, str(tmp_path / "out.ipynb"), "-p", "n_paths", "500", "-p", "out_json",
                        str(tmp_path / "n.json"),
                        "--cwd", str(tmp_path), "--no-progress-bar"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "n.json").read_text())["n_paths"] == 500


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    if os.geteuid() != 0 and not CI: pytest.skip("the platform runs as root (workspaces are the users' own accounts)")
    need_chromium()
    up = Up(platform_env(tmp_path_factory.mktemp("reports-platform") / "data"))
    try:
        up.wait()
        yield up
    finally:
        import signal
        up.stop(signal.SIGTERM)


def test_a_users_run_report_through_the_service(platform):
    import httpx
    from hedgerl.core import load_settings
    from hedgerl.registry import Registry
    up = platform
    (a, token_a), (_, token_b) = approved_user(up), approved_user(up)
    reg = Registry(load_settings(environ=up.env).registry.url).as_user(a)
    with reg.start_run("reports", {"scenario": SCENARIO, "agent": "ntb", "budget": 3}, name="smoke") as run:
        for s in range(3): run.log(s, **{"valid/objective": 250.0 - s})
    reg.engine.dispose()
    api = f"{up.url}/services/hedgerl/api/v1/runs/{run.id}"
    with httpx.Client(timeout=60) as c:
        for kind in ("html", "pdf"):
            assert c.get(f"{api}/report.{kind}", headers={"Authorization": f"token {token_b}"}).status_code == 404
        first = c.get(f"{api}/report.html", headers={"Authorization": f"token {token_a}"})
        assert first.status_code == 202 and first.headers["retry-after"] == "5", first.text
        t0 = time.monotonic()
        while (got := c.get(f"{api}/report.html", headers={"Authorization": f"token {token_a}"})).status_code == 202:
            assert time.monotonic() - t0 < 300, "the report was not made within 5 minutes"
            time.sleep(1)
        made_s = time.monotonic() - t0
        assert got.status_code == 200 and got.headers["content-type"].startswith("text/html"), got.text[:300]
        assert f"Run {run.id}: reports / smoke" in got.text and 'id="Training"' in got.text
        pdf = c.get(f"{api}/report.pdf", headers={"Authorization": f"token {token_a}"})
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(
                b"%PDF")
        assert c.get(f"{api}/report.pdf", headers={"Authorization": f"token {token_b}"}).status_code == 404
    from io import BytesIO
    from pypdf import PdfReader
    text = " ".join(" ".join(p.extract_text().split()) for p in PdfReader(BytesIO(pdf.content)).pages)
    assert f"Run {run.id}: reports / smoke" in text and "Figure 1: terminal P&L" in text and "budget" in text
    print(f"run report through the service: made in {made_s:.1f} s")
