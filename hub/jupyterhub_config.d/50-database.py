"""The hub's database: [hub] db_url, a SQLite file in the state folder by default; PostgreSQL by URL
(`postgresql+psycopg://user@host/db`). Users, approvals (NativeAuthenticator's users_info), groups and tokens live
here."""


def configure(c, ctx):
    url = str(ctx.settings.hub.db_url)
    if not url.startswith(("sqlite:", "postgresql")):
        raise ValueError(f"setting [hub] db_url = {url!r}: the hub's database is a sqlite:/// file or a "
                         f"postgresql+psycopg:// URL")
    c.JupyterHub.db_url = url
