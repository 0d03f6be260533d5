"""Kubernetes (Zero to JupyterHub with dask-gateway beside it: hub/kubernetes/values.yaml): KubeSpawner, named by string
so that kubespawner is needed where the hub runs, not to load this file. The profile list comes from [hub] profiles:
each profile's cores and memory as requests and limits, its GPUs as the NVIDIA device plugin's `nvidia.com/gpu`
resource, and the workspace image with hedgerl installed (hub/kubernetes/Dockerfile.workspace)."""
import importlib.util
import sys
from pathlib import Path

HOME = "/home/jovyan"  # the image's user; the chart mounts a volume per user here


def _profiles_module():
    "hub/profiles.py (hub/ is not a package)."
    name = "hedgerl_hub_profiles"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "profiles.py")
        mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered first: dataclasses look it up
        try: spec.loader.exec_module(mod)
        except BaseException: del sys.modules[name]; raise
    return sys.modules[name]


def kube_profile(p) -> dict:
    "One entry of KubeSpawner's `profile_list` for the profile `p` (hub/profiles.py's Profile)."
    if "image" not in p.kubernetes:
        raise ValueError(f"profile {p.slug!r}: no kubernetes image (set kubernetes.image in the profiles file)")
    o = {"image": p.kubernetes["image"], "cpu_guarantee": float(p.cpu), "cpu_limit": float(p.cpu),
         "mem_guarantee": p.memory, "mem_limit": p.memory}
    if p.gpu: o["extra_resource_limits"] = {"nvidia.com/gpu": str(p.gpu)}  # extended resources: requests = limits
    if p.kubernetes.get("node_selector"): o["node_selector"] = dict(p.kubernetes["node_selector"])
    if p.kubernetes.get("tolerations"): o["tolerations"] = [dict(t) for t in p.kubernetes["tolerations"]]
    return {"display_name": p.display_name, "slug": p.slug, "description": p.description, "default": p.default,
            "kubespawner_override": o}


def configure(c, ctx):
    profiles = _profiles_module().load_profiles(ctx.settings.hub.profiles)
    c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
    c.KubeSpawner.profile_list = [kube_profile(p) for p in profiles]
    # the image's environment (hedgerl, the `hedgerl` kernel, Voila, TensorBoard)
    c.KubeSpawner.cmd = ["jupyterhub-singleuser"]
    c.KubeSpawner.default_url = "/lab"
    c.KubeSpawner.environment.update({"HEDGERL_DATA_FOLDER": f"{HOME}/.hedgerl"})  # per-user runs, models, caches
