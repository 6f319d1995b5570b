"""`make run` serves the OpenAPI document of every route it serves at GET /openapi.json."""

from __future__ import annotations

import json

import httpx
import pytest

from local.openapi import OPENAPI_FILE
from tests.support.hermes_process import HermesProcess

pytestmark = pytest.mark.integration


def test_the_runner_serves_the_committed_openapi_document(hermes_env: dict[str, str]) -> None:
    with HermesProcess({**hermes_env, "HERMES_API_KEY": "k"}) as runner:
        headers = {"Authorization": "Bearer k"}
        response = httpx.get(f"{runner.url}/openapi.json", headers=headers, timeout=10)
        assert response.status_code == 200
        assert response.json() == json.loads(OPENAPI_FILE.read_text())
        # Behind the runner's key like every other route.
        assert httpx.get(f"{runner.url}/openapi.json", timeout=10).status_code == 401
