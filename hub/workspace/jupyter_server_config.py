"""What every workspace's JupyterLab reads (the hub points JUPYTER_CONFIG_PATH here): the `hedgerl` kernel (the
environment with hedgerl installed) as the only kernel, Voila as a server extension (/voila/), and TensorBoard one click
away in the launcher (jupyter-server-proxy at /tensorboard/) on the user's run logs, $HEDGERL_DATA_FOLDER/runs."""
import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821 (traitlets gives get_config)

c.ServerApp.jpserver_extensions.update({"voila": True, "jupyter_server_proxy": True,
                                       # Panel's "preview" routes: unused here, and importing Panel at every start costs
                                       # ~3 s of a spawn
                                       "panel.io.jupyter_server_extension": False})
# Voila pages ask no other host: no MathJax from a CDN (the dashboards write no TeX), no Font Awesome from a CDN (the
# `hedgerl` template, share/voila/templates/hedgerl, found through JUPYTER_PATH), and none of the JupyterLab extensions
# that need Lab's shell (they fail in Voila's page with console errors)
c.ServerApp.tornado_settings = {"mathjax_url": "null", "mathjax_config": "null"}
c.VoilaConfiguration.template = "hedgerl"
c.VoilaConfiguration.extension_denylist = ["jupyterlab-jupytext", "@pyviz/jupyterlab_pyviz",
                                           "@jupyterhub/jupyter-server-proxy"]
c.MappingKernelManager.default_kernel_name = "hedgerl"
c.KernelSpecManager.allowed_kernelspecs = {"hedgerl"}
c.KernelSpecManager.ensure_native_kernel = False

runs = Path(os.environ.get("HEDGERL_DATA_FOLDER") or "~/.hedgerl").expanduser() / "runs"
c.ServerProxy.servers = {
    "tensorboard": {
        "command": [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1",
                    "--port", "{port}", "--path_prefix", "{base_url}tensorboard", "--reload_interval", "15"],
        "absolute_url": True,
        "timeout": 60,
        "launcher_entry": {"title": "TensorBoard", "icon_path": str(Path(__file__).parent / "tensorboard.svg"),
                           "category": "Other"},
        "new_browser_tab": False,
    },
}
