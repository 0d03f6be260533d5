"""Workspaces on one machine: each user's JupyterLab (`jupyterhub-singleuser` of this environment, the `hedgerl` kernel,
Voila, TensorBoard in the launcher: hub/workspace/jupyter_server_config.py) as a local process.

As root (these machines, CI) each workspace runs as the user's own system account, made on first spawn: home
/home/<name> (0700), its own primary group, a member of the system group `hedgerl` (what marks the platform's
accounts), /bin/bash. An existing account outside that group is never taken over. A new home gets the tutorials, the
run template and the Voila dashboards in ~/hedgerl/, copied by the user's own account. Not root: every workspace runs
as the hub's own account, each in a folder of its own under the data folder; users are NOT isolated from each other,
and the hub says so at start and on its pages. Profiles come from [hub] profiles; the GPU ones are offered only where
`nvidia-smi -L` lists enough GPUs."""
import asyncio
import grp
import html
import importlib.util
import logging
import os
import pwd
import subprocess
import sys
import threading
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner
from traitlets import Bool, Dict, List, Unicode, default

PLATFORM_GROUP = "hedgerl"
NOT_ISOLATED = ("This hub runs without root: every workspace runs as the same system account, so users are NOT "
                "isolated from each other (anyone can read anyone's files). Use it alone or with people you trust.")
_ACCOUNTS = threading.Lock()  # useradd/groupadd lock /etc/passwd: one at a time


def _profiles_module():
    "hub/profiles.py (hub/ is not a package)."
    name = "hedgerl_hub_profiles"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "profiles.py")
        mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered first: dataclasses look it up
        try: spec.loader.exec_module(mod)
        except BaseException: del sys.modules[name]; raise
    return sys.modules[name]


class AccountError(RuntimeError):
    "A user's system account cannot be used for a workspace (the message says why; the spawn page shows it)."


def ensure_account(name: str, group: str = PLATFORM_GROUP, home_base: str = "/home") -> pwd.struct_passwd:
    """The platform account `name`: made if missing (own group, member of `group`, home 0700); an account outside
    `group` is refused."""
    with _ACCOUNTS:
        try: grp.getgrnam(group)
        except KeyError: _run(["groupadd", "--system", group], f"creating the system group {group!r}")
        try: pw = pwd.getpwnam(name)
        except KeyError:
            _run(["useradd", "--create-home", "--home-dir", f"{home_base}/{name}", "--shell", "/bin/bash",
                  "--user-group",
                  "--groups", group, "--comment", "hedgerl workspace", name], f"creating the system account {name!r}")
            pw = pwd.getpwnam(name)
        else:
            g = grp.getgrnam(group)
            if pw.pw_gid != g.gr_gid and name not in g.gr_mem:
                raise AccountError(f"The system account {name!r} exists and is not a platform account (not in the "
                                   f"group "
                                   f"{group!r}): a workspace cannot run as it. Ask an administrator.")
    home = Path(pw.pw_dir)
    if not home.is_dir() or home.is_symlink() or home.stat().st_uid != pw.pw_uid:
        raise AccountError(f"The home folder {home} of {name!r} is missing or not owned by {name!r}. Ask an "
                           f"administrator.")
    home.chmod(0o700)
    return pw


def _run(cmd, what):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode not in (0, 9):  # 9: it exists already (made meanwhile)
        raise AccountError(f"{what} failed: {' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")


def seed_workspace(home: Path, files: list[str], pw: pwd.struct_passwd | None = None) -> bool:
    """Copy `files` into `home`/hedgerl if it does not exist yet, as the account `pw` (None: this process); whether it
    copied."""
    script = ("import pathlib, shutil, sys\n"
              "(pathlib.Path(sys.argv[1]) / '.hedgerl' / 'runs').mkdir(parents=True, exist_ok=True)\n"
              "d = pathlib.Path(sys.argv[1]) / 'hedgerl'\n"
              "if d.exists() or d.is_symlink(): sys.exit(3)\n"
              "d.mkdir()\n"
              "for f in sys.argv[2:]: shutil.copyfile(f, d / pathlib.Path(f).name)\n"
              # notebooks open on the workspace's one kernel (the templates name python3, which papermill finds
              # anywhere)
              "import json\n"
              "for nb in d.glob('*.ipynb'):\n"
              "    doc = json.loads(nb.read_text())\n"
              "    doc.setdefault('metadata', {})['kernelspec'] = {'name': 'hedgerl', 'display_name': 'hedgerl', "
              "'language': 'python'}\n"
              "    nb.write_text(json.dumps(doc, indent=1))\n")
    as_user = {} if pw is None else dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], umask=0o077)
    p = subprocess.run([sys.executable, "-I", "-c", script, str(home), *files], cwd=str(home), capture_output=True,
                       text=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, **as_user)
    if p.returncode not in (0,
                            3): raise AccountError(f"copying the tutorials into {home}/hedgerl failed: "
                                                   f"{p.stderr.strip()[-500:]}")
    return p.returncode == 0


class WorkspaceSpawner(LocalProcessSpawner):
    """A workspace per user: as root under the user's own account (made on first spawn), else under the hub's (not
    isolated)."""
    isolate = Bool(True, config=True, help="run each workspace as the user's own system account (needs root)")
    platform_group = Unicode(PLATFORM_GROUP, config=True, help="the system group of the platform's accounts")
    workspaces = Unicode(config=True, help="not isolated: the folder that holds each user's workspace folder")
    seed_files = List(Unicode(), config=True, help="notebooks copied into ~/hedgerl on a user's first spawn")
    profiles = List(Dict(), config=True,
                    help="the profiles offered: slug, display_name, description, default, cpu, memory, gpu")

    @default("options_form")
    def _options_form_default(self):
        if len(self.profiles) < 2: return ""
        rows = []
        for p in self.profiles:
            checked = " checked" if p.get("default") else ""
            rows.append(f'<label class="form-check"><input class="form-check-input" type="radio" name="profile" '
                        f'value="{html.escape(p["slug"])}"{checked}> <strong>{html.escape(p["display_name"])}</strong> '
                        f'<span class="text-muted">{html.escape(p.get("description", ""))}</span></label>')
        return "\n".join(rows)

    def options_from_form(self, formdata):
        return {"profile": (formdata.get("profile") or [self.profile["slug"]])[0]}

    @property
    def profile(self) -> dict:
        "The profile this spawn uses (the user's choice, else the default)."
        if not self.profiles: return {"slug": "default", "cpu": 0, "memory": "", "gpu": 0}
        slug = (self.user_options or {}).get("profile")
        if slug is None: return next((p for p in self.profiles if p.get("default")), self.profiles[0])
        for p in self.profiles:
            if p["slug"] == slug: return p
        raise ValueError(
                f"profile {slug!r} is not offered here; offered: {', '.join(p['slug'] for p in self.profiles)}")

    def home(self) -> Path:
        if self.isolate: return Path(pwd.getpwnam(self.user.name).pw_dir)
        return Path(self.workspaces) / self.user.name

    async def start(self):
        p = self.profile  # an unknown profile fails before anything is made
        self.cpu_limit, self.mem_limit = float(p.get("cpu") or 0) or None, p.get("memory") or None
        if self.isolate:
            pw = await asyncio.to_thread(ensure_account, self.user.name, self.platform_group)
            await asyncio.to_thread(seed_workspace, Path(pw.pw_dir), self.seed_files, pw)
        else:
            self.log.warning("workspace of %s: NOT isolated (the hub does not run as root)", self.user.name)
            home = self.home(); home.mkdir(parents=True, exist_ok=True, mode=0o700)
            await asyncio.to_thread(seed_workspace, home, self.seed_files, None)
        return await super().start()

    def make_preexec_fn(self, name):
        if self.isolate: return super().make_preexec_fn(name)
        home = str(self.home())
        return lambda: os.chdir(home)

    def user_env(self, env):
        if self.isolate: return super().user_env(env)
        env.update(USER=self.user.name, HOME=str(self.home()), SHELL="/bin/bash")
        return env

    def get_env(self):
        env = super().get_env()
        bin_ = str(Path(self.cmd[0]).parent)
        env["PATH"] = os.pathsep.join([bin_, *(d for d in env.get("PATH",
                                                                  "/usr/bin:/bin").split(os.pathsep) if d != bin_)])
        env["HEDGERL_DATA_FOLDER"] = str(Path(env["HOME"]) / ".hedgerl")  # per-user runs, models, caches
        env["HEDGERL_WORKSPACE_PROFILE"] = self.profile["slug"]
        if not self.profile.get("gpu"): env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU profile: device="auto" is the CPU
        return env


def configure(c, ctx):
    profiles_mod = _profiles_module()
    all_profiles = profiles_mod.load_profiles(ctx.settings.hub.profiles)
    gpus = len(profiles_mod.local_gpus())
    offered = [p for p in all_profiles if p.gpu <= gpus]
    if not offered:
        raise ValueError(f"{ctx.settings.hub.profiles}: every profile asks for a GPU and `nvidia-smi -L` lists {gpus} "
                         f"here")
    default_slug = next((p.slug for p in offered if p.default), offered[0].slug)
    c.JupyterHub.spawner_class = WorkspaceSpawner
    c.WorkspaceSpawner.profiles = [dict(slug=p.slug, display_name=p.display_name, description=p.description,
                                        default=p.slug == default_slug,
                                        cpu=p.cpu, memory=p.memory, gpu=p.gpu) for p in offered]
    c.WorkspaceSpawner.isolate = bool(ctx.as_root)
    c.WorkspaceSpawner.workspaces = str(Path(ctx.settings.data.folder) / "workspaces")
    nbs = Path(ctx.root) / "nbs"
    c.WorkspaceSpawner.seed_files = ([str(p) for p in sorted((nbs / "tutorials").glob("*.ipynb"))] + [str(nbs / "runs"
            / "train.ipynb")]
                                     + [str(p) for p in sorted((nbs
                                                                # Voila: /user/<name>/voila/render/hedgerl/<file>
                                                                / "dashboards").glob("*.ipynb"))])
    c.Spawner.cmd = [str(ctx.bin / "jupyterhub-singleuser")]
    c.Spawner.default_url = "/lab"
    c.Spawner.http_timeout = 60
    c.Spawner.start_timeout = 120
    c.Spawner.environment.update({"HEDGERL_SETTINGS": str(Path(ctx.root) / "settings.ini"),
                                  "JUPYTER_CONFIG_PATH": str(Path(ctx.root) / "hub" / "workspace"),
                                  "JUPYTER_PATH": str(Path(ctx.root) / "hub" / "workspace"
                                                      / "share")})  # Voila's `hedgerl` template
    if not ctx.as_root:
        logging.getLogger("JupyterHub").warning("hedgerl: %s", NOT_ISOLATED)
        c.JupyterHub.template_vars.update({"announcement": NOT_ISOLATED})
