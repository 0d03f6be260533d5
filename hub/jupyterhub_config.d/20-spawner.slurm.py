"""Slurm (batchspawner on the cluster's login node; the hub runs as root there): each workspace is a Slurm job of the
user's own cluster account, started from an environment with hedgerl installed on a file system every node mounts
(profiles file: slurm.env). wrapspawner's ProfilesSpawner offers the profiles of [hub] profiles, each a SlurmSpawner
with its partition, cores, memory and time, and `--gres=gpu:N` for a GPU profile. Classes are named by string:
batchspawner and wrapspawner are needed where the hub runs, not to load this file. The hub's API listens on every
interface so that jobs on compute nodes reach it at this host's name."""
import importlib.util
import socket
import sys
from pathlib import Path

SLURM_SPAWNER = "batchspawner.SlurmSpawner"
# batchspawner's SlurmSpawner script with the environment's jupyterhub-singleuser (`cmd`); `{{gres}}` carries the GPUs
BATCH_SCRIPT = """#!/bin/bash
#SBATCH --output={{homedir}}/.hedgerl/slurm/workspace-%j.log
#SBATCH --job-name=hedgerl-workspace
#SBATCH --chdir={{homedir}}
#SBATCH --export={{keepvars}}
#SBATCH --get-user-env=L
{% if partition %}#SBATCH --partition={{partition}}
{% endif %}{% if runtime %}#SBATCH --time={{runtime}}
{% endif %}{% if memory %}#SBATCH --mem={{memory}}
{% endif %}{% if gres %}#SBATCH --gres={{gres}}
{% endif %}{% if nprocs %}#SBATCH --cpus-per-task={{nprocs}}
{% endif %}{% if options %}#SBATCH {{options}}
{% endif %}
set -euo pipefail
mkdir -p {{homedir}}/.hedgerl/slurm
trap 'echo SIGTERM received' TERM
{{prologue}}
srun {{cmd}}
{{epilogue}}
"""


def _profiles_module():
    "hub/profiles.py (hub/ is not a package)."
    name = "hedgerl_hub_profiles"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "profiles.py")
        mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered first: dataclasses look it up
        try: spec.loader.exec_module(mod)
        except BaseException: del sys.modules[name]; raise
    return sys.modules[name]


def slurm_profile(p) -> tuple:
    "One entry of ProfilesSpawner's `profiles` for the profile `p`: (display name, key, spawner class, its config)."
    s = p.slurm
    if "env" not in s: raise ValueError(f"profile {p.slug!r}: no slurm env (set slurm.env in the profiles file)")
    env = Path(s["env"])
    conf = {"batch_script": BATCH_SCRIPT, "req_nprocs": str(int(-(-p.cpu // 1))), "req_memory": p.memory,
            "req_partition": s.get("partition", ""), "req_runtime": s.get("runtime", ""),
            "req_options": s.get("options", ""),
            "req_gres": f"gpu:{p.gpu}" if p.gpu else "",
            "batchspawner_singleuser_cmd": str(env / "bin" / "batchspawner-singleuser"),
            "cmd": [str(env / "bin" / "jupyterhub-singleuser")],
            "environment": {"HEDGERL_WORKSPACE_PROFILE": p.slug, **({} if p.gpu else {"CUDA_VISIBLE_DEVICES": ""})}}
    return (p.display_name, p.slug, SLURM_SPAWNER, conf)


def configure(c, ctx):
    profiles = _profiles_module().load_profiles(ctx.settings.hub.profiles)
    c.JupyterHub.spawner_class = "wrapspawner.ProfilesSpawner"
    # ProfilesSpawner preselects the first profile: the default goes first
    c.ProfilesSpawner.profiles = [slurm_profile(p) for p in sorted(profiles, key=lambda p: not p.default)]
    c.Spawner.default_url = "/lab"
    c.Spawner.start_timeout = 600  # a job may wait in the queue
    c.Spawner.http_timeout = 120
    port = ctx.settings.hub.port + 2
    c.JupyterHub.hub_bind_url = f"http://0.0.0.0:{port}"
    c.JupyterHub.hub_connect_url = f"http://{socket.getfqdn()}:{port}"
