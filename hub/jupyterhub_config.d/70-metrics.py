"""Prometheus metrics: /hub/metrics answers only a token holding `read:metrics` (anonymous requests are refused). The
token is the `prometheus` service's, generated into the state folder (secrets/prometheus_token, 0600): point the
scraper's bearer token file at it. The role holds that one scope."""
NAME = "prometheus"


def configure(c, ctx):
    c.JupyterHub.authenticate_prometheus = True
    c.JupyterHub.services.append({"name": NAME, "api_token": ctx.secret("prometheus_token"), "display": False})
    c.JupyterHub.load_roles.append({"name": "metrics-reader", "description": "read /hub/metrics",
                                    "scopes": ["read:metrics"],
                                    "services": [NAME]})
