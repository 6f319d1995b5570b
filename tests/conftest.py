"""Shared fixtures. Tests never touch real AWS: fake credentials, a fixed region, and an
endpoint that is either moto (unit) or a local server (integration)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from local.template import table_definitions

os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    POWERTOOLS_METRICS_DISABLED="true",  # tests that check metrics turn them back on
)
for _name in [
    n
    for n in os.environ
    if n.startswith("HERMES_") or n in ("OLLAMA_URL", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_PROFILE")
]:
    del os.environ[_name]


# Each directory is a tier; pytest reads `pytestmark` from test modules only (never from a
# conftest), so the directory's mark is put on every test it collects that names no tier of
# its own: `-m "not integration"` then leaves every test that starts a server out.
TIERS = {
    "integration": "integration",
    "support": "integration",
    "template": "template",
    "e2e": "real_model",
    "sam_local": "sam_local",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = TIERS.get(item.path.parent.name)
        if tier and not any(item.get_closest_marker(name) for name in set(TIERS.values())):
            item.add_marker(tier)


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Settings, the service and the jobs built on it are cached per process; each test gets
    its own."""
    from hermes.config import get_settings
    from hermes.jobs import get_jobs
    from hermes.service import get_service

    caches = (get_settings, get_service, get_jobs)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


# moto is not thread-safe (its own FAQ): a TransactWriteItems deep-copies the table while
# another thread's write changes it ("dictionary changed size during iteration"). The service
# releases on threads of its own beside the pool's bookkeeping, so every moto request is
# serialized, as DynamoDB applies them; the limiter's races are tested on DynamoDB Local.
_MOTO_LOCK = threading.RLock()


def _serialized(
    call: Callable[..., Any],
) -> Callable[..., Any]:
    def serialized(self: Any, event_name: str, request: Any, **kwargs: Any) -> Any:
        with _MOTO_LOCK:
            return call(self, event_name, request, **kwargs)

    return serialized


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto in-process, with the tables created from template.yaml's own definitions, one
    request at a time."""
    from moto.core.botocore_stubber import BotocoreStubber

    monkeypatch.setattr(BotocoreStubber, "__call__", _serialized(BotocoreStubber.__call__))
    with mock_aws():
        client = boto3.client("dynamodb")
        for definition in table_definitions().values():
            client.create_table(**definition)
        yield
