"""Authentication: NativeAuthenticator (passwords hashed with bcrypt in the hub database), open sign-up, an
administrator approves each account at /hub/authorize, and nobody else gets in (`allow_all` stays off): a user is
allowed iff their sign-up is approved, or they are the [hub] admin. Approved users join the JupyterHub group
`researchers`, which the hedgerl service's role names: at approval, at login and at hub start; withdrawing approval
takes them out of it and ends their browser session at the next refresh (`auth_refresh_age`). Groups stay editable by
the REST API (an administrator may add an account made by the API, e.g. a robot, to `researchers`). User names become
system account names: `[a-z][a-z0-9_-]{0,30}`, and never an existing system account or group that is not the
platform's. Also the two fixes NativeAuthenticator 1.3.0 needs on JupyterHub 6.1 (below)."""
import grp
import pwd
import re

from nativeauthenticator import NativeAuthenticator
from nativeauthenticator import handlers as native
from traitlets import Enum, Unicode

USERNAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")
GROUP = "researchers"  # the JupyterHub group of approved users
PLATFORM_GROUP = "hedgerl"  # the system group of the platform's accounts (20-spawner.local.py creates them)
MIN_PASSWORD = 8  # as hedgerl.platform.set_hub_password
FAILED_LOGINS, LOCKOUT_S = 5, 300


def is_platform_account(name: str, group: str = PLATFORM_GROUP) -> bool:
    "Whether the system account `name` is one of the platform's (a member of the system group `group`)."
    try: g, pw = grp.getgrnam(group), pwd.getpwnam(name)
    except KeyError: return False
    return pw.pw_gid == g.gr_gid or name in g.gr_mem


def site_account_problem(name: str, uid_min: int = 1000) -> str | None:
    "Why `name` is not a user account of this cluster (a Slurm job runs as it), or None."
    try: pw = pwd.getpwnam(name)
    except KeyError: return f"{name!r} has no account on this cluster: sign up with your cluster user name"
    return None if pw.pw_uid >= uid_min else (f"{name!r} is a system account of this cluster: sign up with your own "
                                              f"user name")


def system_name_problem(name: str, group: str = PLATFORM_GROUP) -> str | None:
    """Why `name` cannot become a platform account on this machine (an existing account or group not the platform's),
    or None."""
    try: pwd.getpwnam(name)
    except KeyError: pass
    else:
        if not is_platform_account(name,
                                   group): return (f"{name!r} is a system account of this machine: choose another user "
                                                   f"name")
        return None
    try: grp.getgrnam(name)
    except KeyError: return None
    return f"{name!r} is a system group of this machine: choose another user name"


class _LoginHandler(native.LoginHandler):
    "NativeAuthenticator's login page, mended for JupyterHub 6.1."

    def _render(self, login_error=None, username=None, sync=False, **kwargs):
        # fix 2: JupyterHub 6 renders a failed form's error page through `_render(..., sync=..., status_code=...)`;
        # NativeAuthenticator 1.3's `_render` takes neither (TypeError)
        ns = dict(next=native.url_escape(self.get_argument("next", default="")), username=username,
                  login_error=login_error,
                  custom_html=self.authenticator.custom_html, login_url=self.settings["login_url"],
                  enable_signup=self.authenticator.enable_signup, two_factor_auth=self.authenticator.allow_2fa,
                  authenticator_login_url=native.url_concat(self.authenticator.login_url(self.hub.base_url),
                                                            {"next": self.get_argument("next", "")}))
        return self.render_template("native-login.html", sync=sync, **ns)

    async def post(self):
        # fix 1: NativeAuthenticator 1.3 times the login with `self.statsd`, which JupyterHub 6 no longer has
        # (AttributeError on every login); this is its `post` without it, with JupyterHub's status and clearer messages
        data = {k: self.get_argument(k, strip=(k == "username")) for k in self.request.body_arguments if k != "_xsrf"}
        user = await self.login_user(data)
        if user:
            self._jupyterhub_user = user
            return self.redirect(self.get_next_url(user))
        username = data.get("username", "")
        self.set_status(403)
        self.finish(await self._render(login_error=self.authenticator.login_problem(username, data.get("password", "")),
                                       username=username[:40]))


class _SignUpHandler(native.SignUpHandler):
    "NativeAuthenticator's sign-up page, saying why a sign-up was refused."

    def get_result_message(self, user, assume_user_is_human, username_already_taken, confirmation_matches,
                           user_is_admin):
        alert, message = super().get_result_message(user, assume_user_is_human, username_already_taken,
                                                    confirmation_matches,
                                                    user_is_admin)
        if user is None and assume_user_is_human and not username_already_taken and confirmation_matches:
            problem = self.authenticator.signup_problem(self.get_body_argument("username", "", strip=False),
                                                        self.get_body_argument("signup_password", "", strip=False))
            if problem: message = problem
        return alert, message


class _ToggleAuthorizationHandler(native.ToggleAuthorizationHandler):
    "NativeAuthenticator's approval toggle (/hub/authorize/<name>), keeping the group `researchers` in step."

    @native.admin_users_scope
    async def get(self, slug):
        if self.authenticator.get_user(slug) is None: raise native.web.HTTPError(404, f"no sign-up named {slug!r}")
        native.UserInfo.change_authorization(self.db, slug)
        self.authenticator.sync_group(slug, remove=True)
        self.redirect(self.hub.base_url + "authorize#" + slug)


class HedgerlAuthenticator(NativeAuthenticator):
    """NativeAuthenticator with admin approval as the allow rule, approved users in the group `researchers`, checked
    names."""
    researchers_group = Unicode(GROUP, config=True, help="the JupyterHub group approved users belong to")
    platform_group = Unicode(PLATFORM_GROUP, config=True, help="the system group of the platform's accounts")
    system_accounts = Enum(["platform", "site", "none"], "platform", config=True,
                           help="what a name must be on this machine: platform: new or the platform's own account "
                           "(local "
                                "workspaces); site: an existing user account (Slurm jobs); none: anything (Kubernetes "
                           "pods)")

    def validate_username(self, username):
        return bool(USERNAME.fullmatch(username)) and super().validate_username(username)

    def signup_problem(self, username: str, password: str) -> str | None:
        "Why this sign-up is refused, or None."
        name = self.normalize_username(username or "")
        if not USERNAME.fullmatch(name):
            return ("A user name is a lowercase letter then up to 30 lowercase letters, digits, _ or - (it becomes a "
                    "system account).")
        if name in self.admin_users: return (f"{name!r} is the hub's administrator; its password is set with `hedgerl "
                                             f"hub admin`.")
        problem = {"platform": lambda: system_name_problem(name, self.platform_group),
                   "site": lambda: site_account_problem(name), "none": lambda: None}[self.system_accounts]()
        if problem: return problem
        if len(password) < self.minimum_password_length:
            return f"The password is too short: at least {self.minimum_password_length} characters."
        if self.check_common_password and self.is_password_common(password): return ("That password is too common: "
                                                                                     "choose another.")
        if name in password.lower(): return "The password must not contain the user name."
        return None

    def create_user(self, username, password, **kwargs):
        if self.signup_problem(username, password): return None
        return super().create_user(username, password, **kwargs)

    def approved(self, username: str) -> bool:
        "Whether `username` signed up and an administrator approved them."
        info = self.get_user(username)
        return bool(info is not None and info.is_authorized)

    def check_allowed(self, username, authentication=None):
        # the allow rule: approved (NativeAuthenticator's users_info) or the administrator; never `allow_all`
        return username in self.admin_users or self.approved(username)

    def login_problem(self, username: str, password: str) -> str:
        "The message for a failed login (never says whether a name exists unless its password was right)."
        name = self.normalize_username(username or "")
        if self.allowed_failed_logins and self.is_blocked(name):
            return f"Too many failed logins: wait {self.seconds_before_next_try} s and try again."
        info = self.get_user(name) if USERNAME.fullmatch(name) else None
        if info is not None and info.is_valid_password(password) and not info.is_authorized:
            return f"User {name} has not been approved by an administrator yet."
        return "Invalid username or password."

    def sync_group(self, name: str, remove: bool = False) -> None:
        """Put the hub user `name` (if the hub has them yet) in the group `researchers` if allowed; out of it if not
        and `remove`."""
        from jupyterhub import orm
        user = orm.User.find(self.db, name)
        if user is None: return
        group = orm.Group.find(self.db, self.researchers_group)
        if self.check_allowed(name):
            if group is None: group = orm.Group(name=self.researchers_group); self.db.add(group)
            if group not in user.groups: user.groups.append(group); self.log.info("%s joins group %s", name, group.name)
        elif remove and group is not None and group in user.groups:
            user.groups.remove(group); self.log.info("%s leaves group %s (not approved)", name, group.name)
        self.db.commit()

    async def authenticate(self, handler, data):
        name = await super().authenticate(handler, data)
        if name is not None: self.sync_group(name)  # an existing hub user; a new one joins in add_user
        return name

    def add_user(self, user):
        super().add_user(user)  # called for a new user after the allow checks, and for every user at hub start
        self.sync_group(user.name)

    async def refresh_user(self, user, handler=None):
        # approval withdrawn: a browser session ends at the next refresh (API tokens keep working without the group)
        return self.check_allowed(user.name)

    def get_handlers(self, app):
        mended = {native.LoginHandler: _LoginHandler, native.SignUpHandler: _SignUpHandler,
                  native.ToggleAuthorizationHandler: _ToggleAuthorizationHandler}
        return [(url, mended.get(h, h)) for url, h in super().get_handlers(app)]


def configure(c, ctx):
    c.JupyterHub.authenticator_class = HedgerlAuthenticator
    c.HedgerlAuthenticator.system_accounts = {"local": "platform", "slurm": "site",
                                              "kubernetes": "none"}[ctx.deployment]
    c.Authenticator.admin_users = {ctx.settings.hub.admin}
    c.Authenticator.allow_all = False
    c.Authenticator.any_allow_config = True  # check_allowed above is the allow rule (approval)
    c.Authenticator.allow_existing_users = False
    c.Authenticator.auth_refresh_age = 60
    c.Authenticator.username_pattern = USERNAME.pattern + r"\Z"
    c.NativeAuthenticator.enable_signup = True
    c.NativeAuthenticator.open_signup = False
    c.NativeAuthenticator.minimum_password_length = MIN_PASSWORD
    c.NativeAuthenticator.check_common_password = True
    c.NativeAuthenticator.allowed_failed_logins = FAILED_LOGINS
    c.NativeAuthenticator.seconds_before_next_try = LOCKOUT_S
