"""`zdni dashboard`: the seed's status service, live: a JSON API and a web page of every run and
stage in one Redis, with the operator's roll back and stop behind a token.

Built on Starlette (routes, static files, a test client; zdni/dashboard/app.py) and served by
uvicorn; what the API answers is read in zdni/dashboard/view.py; the page is static/.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from zdni.dashboard.app import create_app
from zdni.errors import ZdniError
from zdni.security import Curve

__all__ = ["DashboardError", "create_app", "parse_bind", "serve"]

log = logging.getLogger("zdni.dashboard")


class DashboardError(ZdniError, ValueError):
    """The dashboard cannot start: a bad --bind, or its address is taken."""


def parse_bind(bind: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[V6]:PORT', or ':PORT' for loopback) -> (host, port)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DashboardError(f"--bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8050")
    return host.strip("[]") or "127.0.0.1", int(port)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a DashboardError naming the address and why."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DashboardError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); give "
                             f"--bind HOST:PORT") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(redis_url: str, bind: str = "127.0.0.1:8050", token: str | None = None,
          curve: Curve | None = None, default_run: str | None = None) -> None:
    """Serve the dashboard until SIGINT/SIGTERM."""
    import uvicorn

    from zdni.redisserver import connect, mask_url

    host, port = parse_bind(bind)
    sock = listen(host, port)
    if not is_loopback(host):
        log.warning("[dashboard] %s is reachable from other hosts over plain HTTP; the token "
                    "crosses it in clear: put TLS in front, or bind 127.0.0.1 and tunnel", host)
    client = connect(redis_url, fail_fast=True)  # a request while Redis is away: a quick 503
    app = create_app(client, token, curve, default_run)
    shown = f"[{host}]" if ":" in host else host
    log.warning("[dashboard] http://%s:%d/ over Redis %s; operator actions %s", shown,
                sock.getsockname()[1], mask_url(redis_url), "on" if token else "off (no token)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        client.close()
