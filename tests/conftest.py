"""Shared fixtures. Tests never touch real AWS: fake credentials, a fixed region, and an
endpoint that is either moto (unit) or a local server (integration)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


@pytest.fixture
def aws() -> Iterator[None]:
    """moto in-process, with the tables created from template.yaml's own definitions."""
    with mock_aws():
        client = boto3.client("dynamodb")
        for definition in table_definitions().values():
            client.create_table(**definition)
        yield
