"""What the functions need (DynamoDB with the template's tables, the jobs queues, a model
backend), started or reused, at addresses their containers can reach.

Containers on the default bridge reach the host at the bridge's gateway (172.17.0.1);
127.0.0.1 in a container is the container itself. moto's SQS server is started on the
gateway address; a server that listens on loopback only (Ollama's default, the embedded
model, DynamoDB Local: its relay listens on 127.0.0.1 only, local.process.loopback_only; a
DynamoDB the user already runs) is reached through a relay (local/sam/relay.py).

The choices are `make run`'s: AWS_ENDPOINT_URL_DYNAMODB / OLLAMA_URL when set, else
DynamoDB Local (moto without Java), Ollama on localhost:11434 when it answers, else the
embedded Gemma 3 270M.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from local import dynamodb_local, embedded_model
from local.process import free_port
from local.sam.relay import relayed
from local.template import ROOT, functions, load_template, resources

SESSION_FILE = ROOT / ".cache" / "sam" / "session.json"


@dataclass
class Wiring:
    """Where the functions' dependencies are, as seen from the containers."""

    dynamodb: str
    sqs: str
    ollama: str
    queue_urls: dict[str, str]  # logical id -> URL: what `!Ref Queue` means locally
    models_file: str | None = None  # a models file for the layer (the embedded model's)
    # The same servers as seen from this host (tests and the runner talk to these).
    host_dynamodb: str = ""
    host_sqs: str = ""

    def parameters(self) -> dict[str, str]:
        """Template parameters for sam's --parameter-overrides."""
        return {
            "LocalDynamoDbEndpoint": self.dynamodb,
            "LocalSqsEndpoint": self.sqs,
            "OllamaUrl": self.ollama,
        }

    def env_vars(self) -> dict[str, dict[str, str]]:
        """sam's --env-vars: variables that are a `!Ref` to a queue (a URL on AWS, only a
        logical id to sam local) get the local queue's URL. sam applies these only to
        variables the template declares."""
        found = {}
        template = load_template()
        queues = resources(template, "AWS::SQS::Queue")
        for fn in functions(template).values():
            for name, value in fn.environment.items():
                if isinstance(value, dict) and value.get("Ref") in queues:
                    found[name] = self.queue_urls[value["Ref"]]
        return {"Parameters": found}


@contextlib.contextmanager
def endpoints(dynamodb: str, sqs: str) -> Iterator[None]:
    """This process's SDK pointed at the local servers for a moment (the runner's helpers
    read the standard variables), with credentials that can only ever reach them."""
    with mock.patch.dict(
        os.environ,
        {
            "AWS_ENDPOINT_URL_DYNAMODB": dynamodb,
            "AWS_ENDPOINT_URL_SQS": sqs,
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    ):
        yield


def create_tables_and_queues(host_dynamodb: str, host_sqs: str) -> dict[str, str]:
    """The template's tables and queues, exactly as the Docker-free runner creates them."""
    from local.runner import ensure_queues, ensure_tables

    with endpoints(host_dynamodb, host_sqs):
        template = load_template()
        ensure_tables(template)
        return ensure_queues(template)


class Services(contextlib.ExitStack):
    """Starts what is missing; closing stops what it started, in reverse order."""

    def __init__(self, gateway: str, from_environment: bool = True) -> None:
        super().__init__()
        self.gateway = gateway
        # Tests start their own servers whatever the shell says.
        self.environ: Mapping[str, str] = os.environ if from_environment else {}
        self.notes: list[str] = []

    def dynamodb(self) -> tuple[str, str]:
        """(container URL, host URL)."""
        given = self.environ.get("AWS_ENDPOINT_URL_DYNAMODB")
        if given:
            self.notes.append(f"DynamoDB: {given} (AWS_ENDPOINT_URL_DYNAMODB)")
            return self._reachable(given), given
        if dynamodb_local.available():
            store = dynamodb_local.DynamoDBLocal().start()
            self.callback(store.stop)
            self.notes.append(f"DynamoDB: DynamoDB Local on port {store.port}")
            return self._reachable(store.url), store.url
        from local.embedded_moto import start_embedded_moto

        url = start_embedded_moto(self.gateway)
        self.notes.append(f"DynamoDB: moto (no Java/DynamoDB Local) on {url}")
        return url, url

    def sqs(self) -> tuple[str, str]:
        given = self.environ.get("AWS_ENDPOINT_URL_SQS")
        if given:
            self.notes.append(f"SQS: {given} (AWS_ENDPOINT_URL_SQS)")
            return self._reachable(given), given
        from local.embedded_moto import start_embedded_moto

        # moto's single-threaded server in a daemon thread of this process: it ends with it.
        url = start_embedded_moto(self.gateway)
        self.notes.append(f"SQS: moto on {url}")
        return url, url

    def backend(self) -> tuple[str, str | None]:
        """(OLLAMA_URL for the containers, models file for the layer or None)."""
        given = self.environ.get("OLLAMA_URL")
        default = str(load_template()["Parameters"]["OllamaUrl"]["Default"])
        if given:
            self.notes.append(f"Ollama: {given} (OLLAMA_URL)")
            return self._reachable(given), None
        if embedded_model.ollama_answers("http://localhost:11434"):
            self.notes.append("Ollama: http://localhost:11434")
            return self._reachable("http://127.0.0.1:11434"), None
        if self.environ.get("HERMES_EMBEDDED_MODEL") == "0" or not embedded_model.available():
            self.notes.append(
                "Ollama: none at http://localhost:11434 and no embedded model "
                "(make install builds it): models will answer 503"
            )
            return default, None
        print("no Ollama at http://localhost:11434: starting the embedded Gemma 3 270M...")
        server = embedded_model.ModelServer(free_port()).start()
        self.callback(server.stop)
        url = self._reachable(server.url)
        from hermes.config import DEFAULT_MODELS_FILE

        source = Path(self.environ.get("HERMES_MODELS_FILE") or DEFAULT_MODELS_FILE)
        target = ROOT / ".cache" / "sam" / "models.embedded.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        path = embedded_model.models_with_embedded_gemma(source, url, target)
        self.notes.append(f"gemma: embedded Gemma 3 270M (llama-cpp-python) at {url}")
        # The other models keep the template's Ollama URL, as with `make run`.
        return default, str(path)

    def _reachable(self, url: str) -> str:
        container_url, relay = relayed(url, self.gateway)
        if relay is not None:
            self.callback(relay.close)
        return container_url

    def start(self, ollama: str | None = None) -> Wiring:
        """Everything the functions need; `ollama` given (the tests' emulator) skips the choice."""
        dynamodb, host_dynamodb = self.dynamodb()
        sqs, host_sqs = self.sqs()
        queue_urls = create_tables_and_queues(host_dynamodb, host_sqs)
        models_file = None
        if ollama is None:
            ollama, models_file = self.backend()
        return Wiring(
            dynamodb=dynamodb,
            sqs=sqs,
            ollama=ollama,
            queue_urls=queue_urls,
            models_file=models_file,
            host_dynamodb=host_dynamodb,
            host_sqs=host_sqs,
        )


def save_session(wiring: Wiring) -> None:
    """Let `make sam-invoke` use the store and queues of a running `make sam-api`."""
    SESSION_FILE.parent.mkdir(parents=True, exist_ok=True)
    SESSION_FILE.write_text(json.dumps({"pid": os.getpid(), "wiring": asdict(wiring)}))


def load_session() -> Wiring | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        data: dict[str, Any] = json.loads(SESSION_FILE.read_text())
        os.kill(int(data["pid"]), 0)
        wiring = Wiring(**data["wiring"])
        for url in (wiring.host_dynamodb, wiring.host_sqs):
            httpx.get(url, timeout=2)  # any answer will do: the server is up
        return wiring
    return None


def forget_session() -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(SESSION_FILE.read_text())["pid"] == os.getpid():
            SESSION_FILE.unlink()
