"""HTTP: the endpoints (app.py), the server that carries them (server.py), and the web config
file's TLS, basic auth and headers (webconfig.py, auth.py)."""

from .app import WebOptions
from .server import WebServer, parse_listen_address

__all__ = ["WebOptions", "WebServer", "parse_listen_address"]
