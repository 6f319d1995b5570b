"""Section 5: cold start of the LLM and status functions, as Lambda pays it: a fresh
interpreter imports the handler module and serves its first event, against a live
emulator and DynamoDB Local. Each figure is the median of several fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.memory import MemoryLog
from bench.procs import AWS_ENV, Infra, clean_env
from bench.report import Section
from bench.scale import Scale
from bench.stats import median, ms

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "layers" / "hermes"
FUNCTIONS = {  # function directory → the event of its first invocation
    "llm": ROOT / "events" / "llm_generate.json",
    "status": ROOT / "events" / "status.json",
}
DEPENDENCIES = ("fastapi", "mangum", "httpx", "boto3", "pydantic")
TARGET_LLM_S = 1.0
TOP_MODULES = 8

# Run in the fresh interpreter: argv = function dir, layer dir, event file. The clock
# starts once the event is read and the context stub defined, just before the import.
CHILD = """
import json, sys, time

function_dir, layer, event_path = sys.argv[1:4]
with open(event_path) as f:
    event = json.load(f)


class Context:  # what Mangum and Hermes read of Lambda's context object
    function_name = "bench-cold-start"
    function_version = "$LATEST"
    memory_limit_in_mb = 256
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:bench-cold-start"

    def get_remaining_time_in_millis(self):
        return 30000


sys.path[:0] = [function_dir, layer]  # Lambda: /var/task, then the layer's /opt/python
started = time.perf_counter()
import app

imported = time.perf_counter()
response = app.handler(event, Context())
invoked = time.perf_counter()
with open("/proc/self/status") as status:
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"import_s": imported - started, "invoke_s": invoked - imported,
                  "status": response.get("statusCode"), "peak_rss_mb": hwm_kb / 1024}))
"""
DEPS_CHILD = f"""
import time
started = time.perf_counter()
import {", ".join(DEPENDENCIES)}
print(time.perf_counter() - started)
"""


@dataclass(frozen=True)
class ColdStart:
    import_s: float
    invoke_s: float
    process_s: float  # the whole child process, interpreter start and exit included
    peak_rss_mb: float

    @property
    def total_s(self) -> float:
        return self.import_s + self.invoke_s


def _python(args: list[str], env: dict[str, str], cwd: Path) -> tuple[str, str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(args[:2])} failed:\n{done.stderr}")
    return done.stdout, done.stderr, elapsed


def cold_start(function: str, env: dict[str, str], extra: list[str] | None = None) -> Any:
    fn_dir = ROOT / "functions" / function
    args = [*(extra or []), "-c", CHILD, str(fn_dir), str(LAYER), str(FUNCTIONS[function])]
    stdout, stderr, elapsed = _python(args, env, fn_dir)
    result = json.loads(stdout.strip().splitlines()[-1])
    if result["status"] != 200:
        raise RuntimeError(f"{function} cold start answered {result['status']}")
    run = ColdStart(result["import_s"], result["invoke_s"], elapsed, result["peak_rss_mb"])
    return run, stderr


def import_times(stderr: str) -> list[tuple[str, int, float, float]]:
    """`-X importtime` lines → (module, depth, self s, cumulative s)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        depth = (len(name) - len(name.lstrip())) // 2 - 1
        rows.append((name.strip(), depth, int(self_us) / 1e6, int(cumulative_us) / 1e6))
    return rows


def import_table(rows: list[tuple[str, int, float, float]]) -> str:
    by_cumulative = sorted(rows, key=lambda r: -r[3])[:TOP_MODULES]
    by_self = sorted(rows, key=lambda r: -r[2])[:TOP_MODULES]
    lines = [
        f"Top {TOP_MODULES} modules of the LLM function's cold start (import and first "
        "invocation) by cumulative import time, from `python -X importtime` (one run; "
        "depth 0 = imported by the handler module or lazily during the invocation):",
        "",
        "| module | depth | cumulative | self |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{m}` | {d} | {ms(c, 1)} | {ms(s, 1)} |" for m, d, s, c in by_cumulative]
    lines += [
        "",
        f"Top {TOP_MODULES} by self time (the module's own code, children excluded):",
        "",
        "| module | depth | self | cumulative |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{m}` | {d} | {ms(s, 1)} | {ms(c, 1)} |" for m, d, s, c in by_self]
    return "\n".join(lines)


def run(infra: Infra, scale: Scale, _: MemoryLog) -> Section:
    section = Section(5, "Cold start")
    infra.dynamodb.reset_tables()
    infra.emulator.reset()
    env = clean_env(
        **AWS_ENV,
        OLLAMA_URL=infra.emulator.url,
        AWS_ENDPOINT_URL_DYNAMODB=infra.dynamodb.url,
        HERMES_LEASE_TABLE="LeaseTable",
    )
    runs = scale.cold_runs
    for function in FUNCTIONS:
        cold_start(function, env)  # discarded: warms the page cache and writes any .pyc
        results = [cold_start(function, env)[0] for _ in range(runs)]
        total = median([r.total_s for r in results])
        is_llm = function == "llm"
        section.add(
            f"{function} function: import + first invocation, median of {runs}",
            ms(total, 0),
            f"≤ {TARGET_LLM_S:g} s" if is_llm else "",
            total <= TARGET_LLM_S if is_llm else None,
        )
        section.add(
            f"{function} function: import / first invocation",
            f"{ms(median([r.import_s for r in results]), 0)} / "
            f"{ms(median([r.invoke_s for r in results]), 0)}",
        )
        section.add(
            f"{function} function: whole process (interpreter start to exit) / its peak RSS",
            f"{ms(median([r.process_s for r in results]), 0)} / "
            f"{median([r.peak_rss_mb for r in results]):.1f} MB",
        )

    _python(["-c", DEPS_CHILD], env, ROOT)  # discarded, as above
    deps = [float(_python(["-c", DEPS_CHILD], env, ROOT)[0]) for _ in range(runs)]
    section.add(f"bare import of {', '.join(DEPENDENCIES)}, median of {runs}", ms(median(deps), 0))

    _, stderr = cold_start("llm", env, ["-X", "importtime"])
    section.extra_markdown = import_table(import_times(stderr))
    section.note(
        "Each run is a fresh `python -c` process (cwd = the function directory, sys.path "
        "starting with the function directory and layers/hermes), against the emulator and "
        "DynamoDB Local with the template's tables; env OLLAMA_URL, AWS_ENDPOINT_URL_DYNAMODB, "
        "HERMES_LEASE_TABLE=LeaseTable and AWS credentials. The event is events/llm_generate.json "
        "or events/status.json, with a Lambda context stub (30 s remaining). One unmeasured run "
        "first warms the page cache."
    )
    section.note(
        "The venv holds dev tools too: httpx imports its optional CLI (rich, click) when they "
        "are installed, which a Lambda layer built from layers/hermes/requirements.txt would not "
        "do, so these figures are an upper bound on that account."
    )
    return section
