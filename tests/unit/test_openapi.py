"""One OpenAPI document for every public route, generated from the functions' FastAPI apps,
committed as openapi.json and served by the local runner at GET /openapi.json."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from local import openapi
from local.runner import OPENAPI_PATH, MountedRoute, Router, load_handler, path_pattern
from local.template import functions, http_routes

METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return openapi.document()


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, ops in doc["paths"].items()
        for method in ops
        if method in METHODS
    }


def test_the_committed_openapi_json_is_what_the_apps_generate(generated: dict[str, Any]) -> None:
    committed = json.loads(openapi.OPENAPI_FILE.read_text())
    assert committed == generated, "openapi.json is stale: run `make openapi` and commit it"
    assert openapi.main(["--check"]) == 0


def test_every_route_the_template_declares_is_documented_and_nothing_else(
    generated: dict[str, Any],
) -> None:
    declared = {(route.method, route.path) for route in http_routes()}
    assert len(declared) >= 13  # llm, status, jobs, Ollama's and OpenAI's APIs
    assert operations(generated) == declared


def test_errors_are_documented_as_the_json_hermes_answers_never_fastapis_422(
    generated: dict[str, Any],
) -> None:
    text = json.dumps(generated)
    assert "HTTPValidationError" not in text and '"422"' not in text
    openai_paths = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings"}
    for path, ops in generated["paths"].items():
        for method, operation in ops.items():
            ref = operation["responses"]["default"]["content"]["application/json"]["schema"]
            shape = "OpenAIError" if path in openai_paths else "Error"
            assert ref == {"$ref": f"#/components/schemas/{shape}"}, (method, path)
    schemas = generated["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error", "code"]


def test_request_bodies_are_documented_with_their_fields(generated: dict[str, Any]) -> None:
    def body(path: str) -> dict[str, Any]:
        schema = generated["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        return dict(schema["schema"]["properties"])

    assert {"prompt", "system", "options", "format"} <= set(body("/v1/llm/{model}"))
    assert body("/v1/jobs/{model}") == body("/v1/llm/{model}")
    assert {"model", "prompt", "suffix", "keep_alive", "think"} <= set(body("/api/generate"))
    assert {"model", "messages", "tools"} <= set(body("/api/chat"))
    assert {"model", "messages", "max_tokens"} <= set(body("/v1/chat/completions"))
    assert {"model", "prompt"} <= set(body("/v1/completions"))
    jobs = generated["paths"]["/v1/jobs/{model}"]["post"]["responses"]
    assert "202" in jobs


def test_two_functions_defining_one_route_differently_is_an_error() -> None:
    one = {"openapi": "3.1.0", "info": {"version": "1"}, "paths": {"/x": {"get": {}}}}
    with pytest.raises(ValueError, match="GET /x"):
        openapi.merge([one, one])
    a = {**one, "paths": {}, "components": {"schemas": {"E": {"type": "object"}}}}
    b = {**one, "paths": {}, "components": {"schemas": {"E": {"type": "string"}}}}
    with pytest.raises(ValueError, match="'E'"):
        openapi.merge([a, b])


def test_the_local_runner_serves_the_document(generated: dict[str, Any]) -> None:
    """The runner's route, with the handlers it serves (build_app mounts exactly this)."""
    anyio.run(_get_document, generated)


async def _get_document(generated: dict[str, Any]) -> None:
    fns = functions()
    handlers = {name: load_handler(fns[name]) for name in {r.function for r in http_routes()}}
    router = Router(
        [MountedRoute("GET", path_pattern(OPENAPI_PATH), openapi.DocumentApp(handlers))]
    )
    transport = httpx.ASGITransport(app=router)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://hermes") as client:
        response = await client.get(OPENAPI_PATH)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == generated
        assert (await client.post(OPENAPI_PATH)).status_code == 405
