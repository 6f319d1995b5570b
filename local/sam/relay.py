"""A TCP relay from the Docker bridge's gateway address to a server on loopback.

Lambda containers reach the host only at the bridge's gateway (172.17.0.1); 127.0.0.1 in a
container is the container itself. Ollama listens on 127.0.0.1 by default, and so do the
embedded model server and any DynamoDB a user already runs. Rather than asking each to
listen elsewhere, or letting the kernel route loopback traffic (a sysctl: machine-wide),
a relay listens on the gateway address and copies bytes both ways.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit, urlunsplit

LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class Relay:
    def __init__(self, listen_host: str, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server = socket.create_server((listen_host, 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            # Small keep-alive answers would otherwise wait on Nagle + delayed ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join()
        client.close()
        upstream.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until the source ends, then pass the end on (a half-close, like TCP's own)."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def is_loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in LOOPBACK


def relayed(url: str, gateway: str) -> tuple[str, Relay | None]:
    """The URL as a container reaches it: through a new relay when it is on loopback."""
    parts = urlsplit(url)
    if (parts.hostname or "") not in LOOPBACK:
        return url, None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    relay = Relay(gateway, "127.0.0.1", port)
    return urlunsplit(parts._replace(netloc=f"{gateway}:{relay.port}")), relay
