"""One OpenAPI document for every public route: the functions' own FastAPI documents merged
(paths and components), for the routes template.yaml declares.

`python -m local.openapi` (`make openapi`) writes it to openapi.json at the top of the repo;
`--check` only says whether the committed file is current. The local runner serves the same
document at GET /openapi.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from local.template import ROOT, functions, http_routes, load_template

OPENAPI_FILE = ROOT / "openapi.json"
TITLE = "Hermes"
DESCRIPTION = (
    "LLM sidecar in front of Ollama: per-model concurrency limits, a memory budget per host "
    "and timeouts across every Lambda instance. Hermes' own API (/v1/llm, /v1/status, "
    "/v1/jobs), Ollama's (/api/*) and OpenAI's (/v1/chat/completions, /v1/completions, "
    "/v1/models). Every error is JSON in the dialect's own shape."
)


def merge(documents: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The documents as one: their paths and component schemas side by side. A path or a
    schema name two documents define differently is an error, never silently overwritten."""
    merged: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": "", "description": DESCRIPTION},
        "paths": {},
        "components": {"schemas": {}},
    }
    for document in documents:
        document = copy.deepcopy(document)
        merged["openapi"] = document["openapi"]
        merged["info"]["version"] = document["info"]["version"]
        for path, operations in document["paths"].items():
            known = merged["paths"].setdefault(path, {})
            for method, operation in operations.items():
                if method in known:
                    raise ValueError(f"{method.upper()} {path} is defined by two functions")
                known[method] = operation
        for name, schema in document.get("components", {}).get("schemas", {}).items():
            schemas = merged["components"]["schemas"]
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"component schema {name!r} differs between two functions")
    merged["components"]["schemas"] = dict(sorted(merged["components"]["schemas"].items()))
    return merged


def function_apps(handlers: dict[str, Any] | None = None) -> list[Any]:
    """The FastAPI app of each function that serves HTTP routes, in the template's order.
    `handlers` (logical id → Lambda handler) reuses the runner's; else they are imported."""
    template = load_template()
    names = list(dict.fromkeys(route.function for route in http_routes(template)))
    if handlers is None:
        layer = str(ROOT / "layers" / "hermes")
        if layer not in sys.path:
            sys.path.insert(0, layer)
        from local.runner import load_handler

        fns = functions(template)
        handlers = {name: load_handler(fns[name]) for name in names}
    return [handlers[name].app for name in names]


def document(handlers: dict[str, Any] | None = None) -> dict[str, Any]:
    return merge(app.openapi() for app in function_apps(handlers))


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


class DocumentApp:
    """GET /openapi.json in the local runner: the document of the apps it serves, built on
    the first request (not at start, which stays fast)."""

    def __init__(self, handlers: dict[str, Any]) -> None:
        self.handlers = handlers
        self.body: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.responses import Response

        if self.body is None:
            self.body = render(document(self.handlers)).encode()
        await Response(self.body, media_type="application/json")(scope, receive, send)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if openapi.json is stale")
    parser.add_argument("--output", type=Path, default=OPENAPI_FILE)
    args = parser.parse_args(argv)
    text = render(document())
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
