"""The dashboard: REST API, web UI and Prometheus metrics, as one ASGI app.

An extra (``pip install 'taskloom[dashboard]'``: starlette, uvicorn,
prometheus-client); the core never imports it::

    from runtime.dashboard import dashboard_app
    app = dashboard_app(rt, api_keys="keys.toml")   # mount it, or `taskloom dashboard`
"""

from runtime.dashboard.app import Dashboard, dashboard_app
from runtime.dashboard.keys import KeyRing, add_key, load_keys
from runtime.dashboard.metrics import Metrics, MetricsListener, metrics_app

__all__ = ["Dashboard", "KeyRing", "Metrics", "MetricsListener", "add_key", "dashboard_app",
           "load_keys", "metrics_app"]
