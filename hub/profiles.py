"""The workspace profiles of hub/profiles.yaml, read and checked: the one source the local, Kubernetes and Slurm spawner
config files (hub/jupyterhub_config.d/20-spawner.*.py) turn into their own forms. Every error names the file and the
field."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROFILE_KEYS = {"slug", "display_name", "description", "default", "cpu", "memory", "gpu", "kubernetes", "slurm"}
KUBERNETES_KEYS = {"image", "node_selector", "tolerations"}
SLURM_KEYS = {"env", "partition", "runtime", "options"}
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class ProfileError(ValueError):
    "A malformed profiles file; the message names the file and the field."


@dataclass(frozen=True)
class Profile:
    "One workspace profile: what a user picks at spawn."
    slug: str
    display_name: str
    description: str
    default: bool
    cpu: float  # cores
    memory: str  # as written, e.g. "4G" (Kubernetes and Slurm read this form)
    gpu: int
    kubernetes: dict = field(default_factory=dict)  # the deployment's defaults with this profile's overrides
    slurm: dict = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int: m = _MEMORY.match(self.memory); return int(float(m[1]) * _UNITS[m[2]])


def _fail(path, where, msg): raise ProfileError(f"{path}: {where}: {msg}")


def _section(path, where, value, keys) -> dict:
    if value is None: return {}
    if not isinstance(value, dict): _fail(path, where, f"expected a mapping, got {value!r}")
    unknown = sorted(set(value) - keys)
    if unknown: _fail(path, where, f"unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(keys))}")
    for k, v in value.items():
        if k in ("image", "env", "partition", "runtime", "options") and not (isinstance(v, str) and v.strip()):
            _fail(path, f"{where}.{k}", f"expected a non-empty string, got {v!r}")
        if k == "node_selector" and not (isinstance(v, dict) and all(isinstance(x, str) for x in (*v, *v.values()))):
            _fail(path, f"{where}.{k}", f"expected a mapping of strings, got {v!r}")
        if k == "tolerations" and not (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
            _fail(path, f"{where}.{k}", f"expected a list of mappings, got {v!r}")
    return dict(value)


def _profile(path, i, p, defaults) -> Profile:
    where = f"profiles[{i}]"
    if not isinstance(p, dict): _fail(path, where, f"expected a mapping, got {p!r}")
    unknown = sorted(set(p) - PROFILE_KEYS)
    if unknown: _fail(path, where,
                      f"unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(PROFILE_KEYS))}")
    for k in ("slug", "display_name", "cpu", "memory"):
        if k not in p: _fail(path, f"{where}.{k}", "missing")
    slug = p["slug"]
    if not (isinstance(slug, str) and re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", slug)):
        _fail(path, f"{where}.slug", f"expected lowercase letters, digits and -, got {slug!r}")
    for k in ("display_name", "description"):
        if not isinstance(p.get(k, ""), str) or (k == "display_name" and not p[k].strip()):
            _fail(path, f"{where}.{k}", f"expected a non-empty string, got {p.get(k)!r}")
    cpu = p["cpu"]
    if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not cpu > 0:
        _fail(path, f"{where}.cpu", f"expected a number of cores > 0, got {cpu!r}")
    mem = p["memory"]
    if not (isinstance(mem, str) and _MEMORY.match(mem)) or float(_MEMORY.match(mem)[1]) <= 0:
        _fail(path, f"{where}.memory", f"expected a size > 0 like 512M, 4G or 1.5T, got {mem!r}")
    gpu = p.get("gpu", 0)
    if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
        _fail(path, f"{where}.gpu", f"expected an integer >= 0, got {gpu!r}")
    default = p.get("default", False)
    if not isinstance(default, bool): _fail(path, f"{where}.default", f"expected true or false, got {default!r}")
    kube = {**defaults["kubernetes"], **_section(path, f"{where}.kubernetes", p.get("kubernetes"), KUBERNETES_KEYS)}
    slurm = {**defaults["slurm"], **_section(path, f"{where}.slurm", p.get("slurm"), SLURM_KEYS)}
    return Profile(slug, p["display_name"], p.get("description", ""), default, cpu, mem, gpu, kube, slurm)


def load_profiles(
    path: str | Path,  # the profiles file ([hub] profiles)
) -> list[Profile]:
    "The profiles of `path`, checked (unique slugs, at most one default; the first is the default if none says so)."
    path = Path(path)
    try: data = yaml.safe_load(path.read_text())
    except FileNotFoundError: raise ProfileError(f"{path}: no such profiles file (setting [hub] profiles)") from None
    except yaml.YAMLError as e: raise ProfileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict): _fail(path, "top level", f"expected a mapping with a 'profiles' list, got {data!r}")
    unknown = sorted(set(data) - {"profiles", "kubernetes", "slurm"})
    if unknown: _fail(path, "top level",
                      f"unknown key(s) {', '.join(map(str, unknown))}; known: kubernetes, profiles, slurm")
    defaults = {"kubernetes": _section(path, "kubernetes", data.get("kubernetes"), KUBERNETES_KEYS),
                "slurm": _section(path, "slurm", data.get("slurm"), SLURM_KEYS)}
    raw = data.get("profiles")
    if not isinstance(raw, list) or not raw: _fail(path, "profiles", f"expected a non-empty list, got {raw!r}")
    profiles = [_profile(path, i, p, defaults) for i, p in enumerate(raw)]
    slugs = [p.slug for p in profiles]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup: _fail(path, "profiles", f"duplicate slug(s) {', '.join(dup)}")
    if sum(p.default for p in profiles) > 1: _fail(path, "profiles", "more than one profile has default: true")
    if not any(p.default for p in profiles):
        from dataclasses import replace
        profiles[0] = replace(profiles[0], default=True)
    return profiles


def local_gpus() -> list[str]:
    "The GPUs `nvidia-smi -L` lists on this machine (none when it is missing or fails)."
    exe = shutil.which("nvidia-smi")
    if exe is None: return []
    try: out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired): return []
    return [l.strip() for l in out.stdout.splitlines() if l.startswith("GPU ")] if out.returncode == 0 else []

