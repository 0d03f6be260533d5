"""hedgerl.data across processes: the environment switches (HEDGERL_OFFLINE, HEDGERL_DATA_CACHE) and a content hash
stable between runs."""
import json
import sys

import pytest

from conftest import run

pytest.importorskip("bokeh_sampledata")
pytest.importorskip("pyarrow")

AAPL_HASH = "161554f31d57aaf3f8e136566b8d49fe3e972b57e6272cd5ffcefc6a74ae66cf"


def py(code, env=None):
    p = run([sys.executable, "-c", code], env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()[-1]


def test_content_hash_is_stable_across_processes():
    code = ("from hedgerl.data import sample_prices, dataset_info; print(dataset_info(sample_prices('AAPL'), 'a', "
            "'bokeh:AAPL')['content_hash'])")
    assert {py(code, {"PYTHONHASHSEED": s}) for s in ("1", "2")} == {AAPL_HASH}


def test_environment_cache_and_offline(tmp_path):
    """Prices stored under HEDGERL_DATA_CACHE are served offline (HEDGERL_OFFLINE=1); a range beyond them is a clear
    error."""
    env = {"HEDGERL_DATA_CACHE": str(tmp_path), "HEDGERL_OFFLINE": "1"}
    code = """
import json
from hedgerl.data import DataUnavailable, daily_prices, sample_prices, store_prices
store_prices(sample_prices('IBM', '2003-01-01', '2003-12-31'), 'IBM', '2003-01-01', '2003-12-31')
df = daily_prices('IBM', '2003-06-01', '2003-06-30')
try: daily_prices('IBM', '2003-06-01', '2004-01-31'); err = ''
except DataUnavailable as e: err = str(e)
print(json.dumps([len(df), err]))
"""
    n, err = json.loads(py(code, env))
    assert n == 21
    assert "IBM 2003-06-01..2004-01-31: not cached (missing [['2004-01-01', '2004-01-31']]" in err and ("offline mode "
                                                                                                        "is on") in err
    assert (tmp_path / "prices" / "IBM.parquet").is_file()


def test_fetch_path_fails_clearly_without_network(tmp_path):
    """The real yfinance path: offline machines get DataUnavailable naming ticker and range; online ones get prices."""
    code = f"""
from hedgerl.data import DataUnavailable, daily_prices
try: print(len(daily_prices('MSFT', '2019-01-02', '2019-01-31', offline=False, cache_dir={str(tmp_path)!r}, timeout=2)))
except DataUnavailable as e: print(e)
"""
    out = py(code)
    assert out.isdigit() or "MSFT 2019-01-02..2019-01-31: not cached and not reachable" in out, out


def test_a_dataset_from_the_data_layer_is_registered_once(tmp_path):
    """Datasets used by runs go to the registry with their source, date range and content hash."""
    from hedgerl.data import dataset_info, sample_prices
    from hedgerl.registry import Registry
    reg = Registry(f"sqlite:///{tmp_path}/registry.sqlite")
    reg.upgrade()
    info = dataset_info(sample_prices("AAPL"), "aapl-sample", "bokeh:AAPL")
    first = reg.register_dataset(**info)
    assert reg.register_dataset(**info) == first  # the same content is one dataset
    other = dataset_info(sample_prices("AAPL", end="2005-12-30"), "aapl-sample", "bokeh:AAPL")
    assert other["content_hash"] != info["content_hash"] and reg.register_dataset(**other) != first
    rows = reg.datasets("aapl-sample")
    assert len(rows) == 2
    row = rows[rows["id"] == first].iloc[0]
    assert (str(row["start"])[:10], str(row["end"])[:10], row["n_rows"]) == (info["start"], info["end"], 3270)
    assert row["content_hash"] == info["content_hash"] and row["source"] == "bokeh:AAPL"
