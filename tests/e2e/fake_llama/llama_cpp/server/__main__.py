"""`python -m llama_cpp.server --port N ...`: lists one model, and dies by SIGILL, as
llama.cpp compiled for another CPU does, when asked for a completion."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": ALIAS, "object": "model"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        print("completion requested: executing an instruction this CPU lacks", flush=True)
        os.kill(os.getpid(), signal.SIGILL)


parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--model_alias", default="model")
args, _ = parser.parse_known_args()
ALIAS = args.model_alias
print(f"fake llama_cpp.server on port {args.port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
