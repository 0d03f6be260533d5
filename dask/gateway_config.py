"""The dask-gateway server's configuration: `dask-gateway-server -f dask/gateway_config.py`.

Thin: the settings come from `settings.ini` / `HEDGERL_*` through `hedgerl.platform`, and the logic lives in
`gateway_config.d/NN-name[.deployment].py`, applied in order (see dask/README.md).
"""
from pathlib import Path

from hedgerl.platform import PlatformContext, load_config_dir

c = get_config()  # noqa: F821 (traitlets provides get_config)
load_config_dir(c, Path(__file__).parent / "gateway_config.d", PlatformContext())
