"""JupyterHub's configuration: the numbered files of jupyterhub_config.d/ applied in order for the [hub] deployment in
effect (settings.ini and HEDGERL_* overrides, read by hedgerl.core). Start with `jupyterhub -f
hub/jupyterhub_config.py`."""
from pathlib import Path

from hedgerl.platform import PlatformContext, load_config_dir

c = get_config()  # noqa: F821 (traitlets gives get_config)
load_config_dir(c, Path(__file__).parent / "jupyterhub_config.d", PlatformContext())
