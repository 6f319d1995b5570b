"""Model pools on one machine (issue 13): emulated GPU hosts (one Ollama emulator process
each, with its own residency) and Hermes runners sharing one DynamoDB Local, all on loopback.

    with PoolCluster(store, MODELS, workdir=tmp, hosts=3, runners=3) as cluster:
        httpx.post(f"{cluster.runners[0].url}/v1/llm/pooled", json={"prompt": "hi"})
        cluster.stats()["gpu2"]["loads"]  # what reached that "GPU", per tag
        cluster.host_status("gpu2")["circuit"]  # what Hermes shares about it

`models` are the models file's `models` (without `hosts`, a model is served by every host);
the hosts are gpu1..gpuN, each with `memory_budget` and `max_loaded_models`. Every emulator
knows every backend tag of `models`, is weighted as Hermes weighs them (low 1, medium 2, high 4:
its `peak_weight` is comparable with the memory budget) and loads a model in `load_delay_ms`.

The API, kept small (the tests and the benchmark use it):
- `emulators` {host: EmulatorProcess}, `runners` [HermesProcess], `env` (a runner's
  environment: start more with `HermesProcess({**cluster.env, ...})`), `models_file`;
- `reset()`: emulators reset (nothing loaded, counters at zero, behaviours cleared) and
  Hermes' shared host records dropped (residency, load claims, circuits), so placement starts
  from nothing; call it with no request in flight;
- `restart(host)`: a killed host comes back on its port, empty, with its weights;
- `running(host)`; `stats()` {host: emulator stats} of the running hosts;
- `status(runner)` (HTTP code, /v1/status body); `host_status(host)`; `host_records()`
  (Hermes' `host#<host>`/`host` items);
- `wait_until(check, timeout_s, what)`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

import httpx

from local.dynamodb_local import DynamoDBLocal
from local.process import ChildProcess
from local.template import ROOT
from tests.support.emulator_process import EmulatorProcess
from tests.support.hermes_process import HermesProcess
from tests.support.polling import wait_until

WEIGHTS = {"low": 1, "medium": 2, "high": 4}  # Hermes' default memory weights
LEASE_TABLE = "LeaseTable"
RUNNER = [sys.executable, "-m", "local.runner"]  # as HermesProcess starts one


class PoolCluster:
    def __init__(
        self,
        store: DynamoDBLocal,
        models: Mapping[str, Mapping[str, Any]],
        *,
        workdir: Path,
        hosts: int = 3,
        runners: int = 3,
        memory_budget: int = 8,
        max_loaded_models: int | None = 2,
        load_delay_ms: float = 200,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.hosts = [f"gpu{i + 1}" for i in range(hosts)]
        self.tags = sorted({m["backend_model"] for m in models.values()})
        self.weights = {m["backend_model"]: WEIGHTS[m["memory_cost"]] for m in models.values()}
        self.emulators = {
            host: EmulatorProcess(
                max_loaded_models=max_loaded_models or 0, load_delay_ms=load_delay_ms
            )
            for host in self.hosts
        }
        for emulator in self.emulators.values():
            emulator.command += ["--models", ",".join(self.tags)]  # every tag of `models`
        host_entries = {
            host: {
                "memory_budget": memory_budget,
                "url": self.emulators[host].url,
                "max_loaded_models": max_loaded_models,
            }
            for host in self.hosts
        }
        pooled = {n: {"hosts": self.hosts, **m} for n, m in models.items()}
        for model in pooled.values():
            if "host" in model:
                del model["hosts"]
        self.models_file = workdir / "pool-models.json"
        self.models_file.write_text(json.dumps({"models": pooled, "hosts": host_entries}))
        self.env = {
            "AWS_ENDPOINT_URL_DYNAMODB": store.url,
            "HERMES_MODELS_FILE": str(self.models_file),
            "HERMES_LEASE_MARGIN_MS": "500",
            "HERMES_CIRCUIT_COOLDOWN_S": "1",
            "HERMES_EMBEDDED_MODEL": "0",  # no OLLAMA_URL: never start the embedded model
            **(env or {}),
        }
        self.runners = [HermesProcess(self.env) for _ in range(runners)]
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            for emulator in self.emulators.values():
                stack.enter_context(emulator)
                emulator.set_weights(self.weights)
            # All at once (each takes seconds to import), from this thread: a runner dies with
            # the thread that started it.
            for runner in self.runners:
                runner.child = ChildProcess("the Hermes runner", RUNNER, env=runner.env, cwd=ROOT)
                stack.callback(_stop, runner)
                runner.child.start()
            for runner in self.runners:
                assert runner.child is not None
                runner.child.wait_until(functools.partial(_answers, runner.url), timeout_s=60)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def urls(self) -> list[str]:
        return [runner.url for runner in self.runners]

    def reset(self) -> None:
        for host, emulator in self.emulators.items():
            if self.running(host):
                emulator.reset()
                emulator.set_weights(self.weights)
        client = self.store.client()
        for item in self.host_records():
            client.delete_item(TableName=LEASE_TABLE, Key={"pk": item["pk"], "sk": item["sk"]})

    def restart(self, host: str) -> EmulatorProcess:
        emulator = self.emulators[host].restart()
        emulator.set_weights(self.weights)
        return emulator

    def running(self, host: str) -> bool:
        child = self.emulators[host].child
        return child is not None and child.returncode is None

    def stats(self) -> dict[str, dict[str, Any]]:
        """{host: its emulator's stats} for the hosts that run (a killed one is left out)."""
        return {h: e.stats() for h, e in self.emulators.items() if self.running(h)}

    def status(self, runner: int = 0) -> tuple[int, dict[str, Any]]:
        response = httpx.get(f"{self.runners[runner].url}/v1/status", timeout=10)
        return response.status_code, response.json()

    def host_status(self, host: str, runner: int = 0) -> dict[str, Any]:
        return next(h for h in self.status(runner)[1]["hosts"] if h["name"] == host)

    def host_records(self) -> list[dict[str, Any]]:
        """Hermes' shared records of hosts (sk `host`), as DynamoDB items."""
        items = self.store.client().scan(TableName=LEASE_TABLE, ConsistentRead=True)["Items"]
        return [item for item in items if item["sk"]["S"] == "host"]

    wait_until = staticmethod(wait_until)


def _answers(url: str) -> bool:
    """Hermes' own /v1/status answers there (not another server that took the port)."""
    return "checks" in httpx.get(f"{url}/v1/status", timeout=5).json()


def _stop(runner: HermesProcess) -> None:
    runner.stop()
    if runner.child is not None:
        runner.child.close()  # its output file
