"""An in-process DynamoDB for `make run`: moto's server on a loopback port.

moto is not concurrency safe (its update_item reads, checks and writes without a
lock), so the server is single-threaded: requests are served one at a time, which
makes every conditional write atomic, as the limiter needs.
"""

from __future__ import annotations

import logging
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


class _NoDelayHandler(MotoRequestHandler):
    # Small keep-alive answers would otherwise wait on Nagle + delayed ACK (~40 ms).
    disable_nagle_algorithm = True


def start_embedded_dynamodb(host: str = "127.0.0.1") -> str:
    """Start the store in a daemon thread; returns its endpoint URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per DynamoDB call
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(host, 0, app, threaded=False, request_handler=_NoDelayHandler)
    threading.Thread(target=server.serve_forever, name="embedded-dynamodb", daemon=True).start()
    return f"http://{host}:{server.server_address[1]}"
