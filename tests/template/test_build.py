"""`sam build` output works on its own: a fresh interpreter that sees only the built function,
the built layer and the boto3 the Lambda runtime provides answers events/ through the handler.
This is as close to `sam local invoke` as a machine without Docker gets."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore
import pytest
from packaging.utils import canonicalize_name

from local.embedded_moto import start_embedded_moto
from local.template import ROOT, table_definitions
from tests.support.ollama_emulator import OllamaEmulator

pytestmark = pytest.mark.template
RUNTIME_PACKAGES = ["boto3", "botocore", "jmespath", "s3transfer", "dateutil", "urllib3", "six.py"]
# the distributions RUNTIME_PACKAGES come from
RUNTIME_DISTS = {"boto3", "botocore", "jmespath", "s3transfer", "python-dateutil", "urllib3", "six"}
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}  # e_machine: EM_X86_64, EM_AARCH64


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sam-build")
    result = subprocess.run(
        [
            Path(sys.executable).parent / "sam",
            "build",
            "--build-dir",
            str(out),
            "--parameter-overrides",
            "Architecture=x86_64",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def lambda_runtime_packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the python3.11 Lambda runtime itself provides: boto3 and its dependencies."""
    site = Path(botocore.__file__).parent.parent
    out = tmp_path_factory.mktemp("runtime")
    for name in RUNTIME_PACKAGES:
        src = site / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / name)
    return out


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, str]]:
    endpoint = start_embedded_moto()
    client = boto3.client("dynamodb", endpoint_url=endpoint)
    existing = client.list_tables()["TableNames"]  # the in-process server may be shared
    for definition in table_definitions().values():
        if definition["TableName"] not in existing:
            client.create_table(**definition)
    with OllamaEmulator() as emulator:
        yield {
            "AWS_ENDPOINT_URL_DYNAMODB": endpoint,
            "OLLAMA_URL": emulator.url,
            "HERMES_LEASE_TABLE": "LeaseTable",
        }


INVOKE = """
import json, sys
from app import handler
class Context:
    function_name = "test"; aws_request_id = "req-1"; memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test"
    def get_remaining_time_in_millis(self): return 30000
print(json.dumps(handler(json.load(open(sys.argv[1])), Context())))
"""


def invoke_built(
    build_dir: Path, runtime: Path, function: str, event: str, env: dict[str, str]
) -> dict:
    path = os.pathsep.join(
        [str(build_dir / function), str(build_dir / "HermesLayer" / "python"), str(runtime)]
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", INVOKE, str(ROOT / "events" / event)],  # -S: no site-packages
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": path,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            **env,
        },
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_built_llm_function_answers_a_prompt(
    build_dir: Path, lambda_runtime_packages: Path, backends: dict[str, str]
) -> None:
    response = invoke_built(
        build_dir, lambda_runtime_packages, "LlmFunction", "llm_generate.json", backends
    )
    assert response["statusCode"] == 200, response
    assert json.loads(response["body"])["result"]


def test_built_llm_function_rejects_bad_input(
    build_dir: Path, lambda_runtime_packages: Path, backends: dict[str, str]
) -> None:
    response = invoke_built(
        build_dir, lambda_runtime_packages, "LlmFunction", "llm_invalid_json.json", backends
    )
    assert response["statusCode"] == 400
    assert json.loads(response["body"])["code"] == "invalid_request"


def test_built_status_function_reports_health(
    build_dir: Path, lambda_runtime_packages: Path, backends: dict[str, str]
) -> None:
    response = invoke_built(
        build_dir, lambda_runtime_packages, "StatusFunction", "status.json", backends
    )
    body = json.loads(response["body"])
    assert response["statusCode"] == 200, body
    assert body["status"] == "healthy"
    assert [m["name"] for m in body["models"]] == ["gemma", "llama3", "mistral"]


def test_built_llm_function_answers_a_direct_invoke(
    build_dir: Path, lambda_runtime_packages: Path, backends: dict[str, str]
) -> None:
    response = invoke_built(
        build_dir, lambda_runtime_packages, "LlmFunction", "direct_generate.json", backends
    )
    assert response["result"] and response["request_id"] == "order-42-summary"


def test_built_jobs_function_reads_jobs(
    build_dir: Path, lambda_runtime_packages: Path, backends: dict[str, str]
) -> None:
    response = invoke_built(
        build_dir, lambda_runtime_packages, "JobsFunction", "jobs_get.json", backends
    )
    assert (response["statusCode"], json.loads(response["body"])["code"]) == (404, "job_not_found")


def test_built_worker_refuses_a_non_sqs_event(
    build_dir: Path, lambda_runtime_packages: Path, backends: dict[str, str]
) -> None:
    response = invoke_built(
        build_dir, lambda_runtime_packages, "WorkerFunction", "direct_unknown_event.json", backends
    )
    assert response["code"] == "invalid_request"


def test_the_built_layer_leaves_botocore_to_the_runtime(build_dir: Path) -> None:
    """The layer ships no second botocore: neither it nor boto3's other dependencies, which
    the runtime provides; aws-xray-sdk and its own dependency wrapt are there."""
    layer = build_dir / "HermesLayer" / "python"
    shipped = {path.name for path in layer.iterdir()}
    assert {"hermes", "aws_xray_sdk", "wrapt", "aws_lambda_powertools"} <= shipped
    assert not shipped & set(RUNTIME_PACKAGES)
    dists = {canonicalize_name(info.name.split("-")[0]) for info in layer.glob("*.dist-info")}
    assert "aws-xray-sdk" in dists and not dists & RUNTIME_DISTS


ONE_BOTOCORE = """
import json, os, sys
import app
from hermes.aws import client
from hermes.observability import start_tracing
tracing = start_tracing()  # active tracing: powertools' Tracer patches botocore and httpx
client("dynamodb")
import botocore, botocore.client
copies = [p for p in sys.path if os.path.exists(os.path.join(p, "botocore", "__init__.py"))]
patched = hasattr(botocore.client.BaseClient._make_api_call, "__wrapped__")
print(json.dumps({"copies": copies, "file": botocore.__file__, "tracing": tracing,
                  "patched": patched}))
"""


def test_the_function_imports_exactly_one_botocore_the_runtimes(
    build_dir: Path, lambda_runtime_packages: Path
) -> None:
    """On the built function's sys.path (function, layer, runtime) there is one botocore, the
    runtime's, and X-Ray's tracing (aws-xray-sdk from the layer) patches that one."""
    path = [build_dir / "LlmFunction", build_dir / "HermesLayer" / "python"]
    result = subprocess.run(
        [sys.executable, "-S", "-c", ONE_BOTOCORE],
        capture_output=True, text=True, timeout=60,
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": os.pathsep.join(map(str, [*path, lambda_runtime_packages])),
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_LAMBDA_FUNCTION_NAME": "test",
            "AWS_XRAY_DAEMON_ADDRESS": "127.0.0.1:2000",
        },
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["copies"] == [str(lambda_runtime_packages)]
    assert Path(seen["file"]).is_relative_to(lambda_runtime_packages)
    assert seen["tracing"] and seen["patched"]


def test_the_built_layer_serves_both_architectures(build_dir: Path) -> None:
    """SAM tells a makefile build nothing of the Architecture parameter: every extension
    module of the layer is there for x86_64 and for arm64, each built for its machine."""
    layer = build_dir / "HermesLayer" / "python"
    modules: dict[str, set[str]] = {}
    for library in layer.rglob("*.so"):
        name = re.fullmatch(r"(.+)\.cpython-311-(\w+)-linux-gnu\.so", str(library))
        assert name, library
        stem, arch = name.groups()
        modules.setdefault(stem, set()).add(arch)
        machine = int.from_bytes(library.read_bytes()[18:20], "little")
        assert machine == ELF_MACHINE[arch], library
    assert any(stem.endswith("_pydantic_core") for stem in modules)
    assert all(arches == set(ELF_MACHINE) for arches in modules.values()), modules
