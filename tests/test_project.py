"""The project's own consistency: the library is what the notebooks export, notebooks are clean,
the README and CI keep their promises, and the numpy paths import without torch."""
import json
import shutil
import sys

from conftest import ROOT, run


def test_library_is_what_the_notebooks_export(tmp_path):
    for item in ("nbs", "pyproject.toml", "settings.ini", "README.md"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    (tmp_path / "hedgerl").mkdir()
    shutil.copy(ROOT / "hedgerl" / "__init__.py", tmp_path / "hedgerl" / "__init__.py")
    run(["nbdev-export"], cwd=tmp_path, check=True)
    exported = sorted(p.relative_to(tmp_path) for p in (tmp_path / "hedgerl").rglob("*.py"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "hedgerl").rglob("*.py"))
    assert exported == committed, "hedgerl/ has modules the notebooks do not export (or lacks some): run `make export`"
    stale = [str(p) for p in exported if (tmp_path / p).read_text() != (ROOT / p).read_text()]
    assert not stale, f"hedgerl/ differs from what nbs/ exports: {stale}; run `make export` and commit both"


def test_notebooks_are_clean(tmp_path):
    notebooks = sorted((ROOT / "nbs").rglob("*.ipynb"))
    notebooks = [p for p in notebooks if ".ipynb_checkpoints" not in p.parts]
    assert len(notebooks) >= 6
    copies = {nb: tmp_path / str(nb.relative_to(ROOT / "nbs")).replace("/", "__") for nb in notebooks}
    for nb, copy in copies.items(): shutil.copy(nb, copy)
    run(["nbdev-clean", "--fname", str(tmp_path)], check=True)  # one process cleans every copy
    dirty = [str(nb.relative_to(ROOT)) for nb, copy in copies.items() if copy.read_bytes() != nb.read_bytes()]
    assert not dirty, f"notebooks not clean (run `make export`): {dirty}"
    # nbval runs the tutorials fresh and refuses stored outputs without execution counts (which cleaning removes)
    with_outputs = [str(nb.relative_to(ROOT)) for nb in notebooks if "tutorials" in nb.parts
                    and any(c.get("outputs") for c in json.loads(nb.read_text())["cells"])]
    assert not with_outputs, (f"tutorials must be saved without outputs (jupyter nbconvert --clear-output --inplace): "
                              f"{with_outputs}")


def test_cell_tags_survive_cleaning(tmp_path):
    nb = {"cells": [{"cell_type": "code", "execution_count": 3, "id": "a1", "metadata": {"tags": ["parameters"],
                                                                                         "scrolled": True},
                     "outputs": [], "source": ["n_paths = 100"]}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    f = tmp_path / "nbs" / "x.ipynb"; f.parent.mkdir()
    f.write_text(json.dumps(nb))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    run(["nbdev-clean", "--fname", str(f)], cwd=tmp_path, check=True)
    meta = json.loads(f.read_text())["cells"][0]["metadata"]
    assert meta == {"tags": ["parameters"]}


def test_readme_starts_with_the_two_commands_and_follows_index():
    readme = (ROOT / "README.md").read_text()
    lines = [l for l in readme.splitlines() if l.strip()]
    assert lines[0] == "# hedgerl"
    assert (lines[1] == "```bash" and lines[2].startswith("make up ") and lines[3].startswith("make test ")
            and lines[4] == "```")
    # cells tagged remove-input (the ones that read reports/*.json) show their output only, as `make readme` renders
    rendered = run(["jupyter", "nbconvert", "--to", "markdown", "--stdout",
                    "--TagRemovePreprocessor.remove_input_tags=remove-input", str(ROOT / "nbs" / "index.ipynb")],
                   check=True).stdout
    assert rendered == readme, "README.md is not the rendering of nbs/index.ipynb: run `make readme`"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    for target in ("up:", "test:"):
        assert f"\n{target}" in makefile
    assert "torch==2.13.0" in makefile


def test_numpy_paths_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from hedgerl.pricing import bs_price, implied_vol\n"
            "from hedgerl.simulators import GBM\n"
            "p = GBM(0.0, 0.2).simulate(10, 5, 0.01, seed=1)\n"
            "assert abs(implied_vol(bs_price(100, 100, 1, 0, 0.2), 100, 100, 1, 0) - 0.2) < 1e-12\n"
            "try:\n    GBM(0.0, 0.2).simulate(10, 5, 0.01, backend='torch')\nexcept ImportError as e:\n    assert 'pip "
            "install torch==2.13.0' in str(e)\n"
            "else:\n    raise AssertionError('expected ImportError')\n")
    run([sys.executable, "-c", code], check=True)


def test_progress_bars_show_in_a_notebook():
    """tqdm.auto in a kernel draws a widget bar (ipywidgets is a dependency): it warned 'IProgress not found' and drew
    none."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in "
                                                                   "tqdm(range(3), desc='work'): pass")])
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    out = nb.cells[0].outputs
    assert not any("IProgress not found" in o.get("text", "") for o in out), out
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in out), out


def test_the_index_names_every_notebook():
    "The front page's list of the source notebooks is complete (it stopped at 21 once)."
    readme = (ROOT / "README.md").read_text()
    missing = [p.stem for p in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")) if f"`{p.stem}`" not in readme]
    assert not missing, f"README/index does not name {missing}"
