"""X-Ray: on Lambda with active tracing, the DynamoDB and Ollama calls of a request are sent
to the X-Ray daemon as subsegments. Run in a fresh interpreter (patching is process-wide)
with a UDP socket standing in for the daemon."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3

from local.embedded_moto import start_embedded_moto
from local.template import ROOT, table_definitions
from tests.support.ollama_emulator import OllamaEmulator

TRACE_ID = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
INVOKE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from app import handler
class Context:
    function_name = "hermes-llm"; aws_request_id = "req-1"; memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:hermes-llm"
    def get_remaining_time_in_millis(self): return 30000
print(json.dumps(handler(json.load(open(sys.argv[3])), Context())))
"""


def test_dynamodb_and_ollama_calls_become_xray_subsegments(tmp_path: Path) -> None:
    store = start_embedded_moto()
    client = boto3.client("dynamodb", endpoint_url=store)
    for definition in table_definitions().values():
        if definition["TableName"] not in client.list_tables()["TableNames"]:
            client.create_table(**definition)
    daemon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    daemon.bind(("127.0.0.1", 0))
    daemon.settimeout(5)
    with OllamaEmulator() as emulator:
        env = {
            **os.environ,
            "AWS_LAMBDA_FUNCTION_NAME": "hermes-llm",
            "LAMBDA_TASK_ROOT": str(tmp_path),
            "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{daemon.getsockname()[1]}",
            "_X_AMZN_TRACE_ID": TRACE_ID,
            "AWS_ENDPOINT_URL_DYNAMODB": store,
            "OLLAMA_URL": emulator.url,
        }
        result = subprocess.run(
            [sys.executable, "-c", INVOKE, str(ROOT / "functions/llm"), str(ROOT / "layers/hermes"),
             str(ROOT / "events/llm_generate.json")],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["statusCode"] == 200
    names = set()
    try:
        while True:
            payload = daemon.recv(65536).decode().split("\n", 1)[1]
            document = json.loads(payload)
            names.add(document.get("name"))
            names |= {sub.get("name") for sub in document.get("subsegments", [])}
    except TimeoutError:
        pass
    daemon.close()
    assert {"dynamodb", "127.0.0.1"} <= names  # the lease table and the Ollama host
