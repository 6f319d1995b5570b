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

from bench import lambda_path
from bench.memory import MemoryLog
from bench.procs import AWS_ENV, Infra, clean_env
from bench.report import Section
from bench.scale import Scale
from bench.stats import median, ms

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "layers" / "hermes"
EVENTS = {  # function directory → the event of its first invocation
    "llm": ROOT / "events" / "llm_generate.json",
    "status": ROOT / "events" / "status.json",
}
DEPENDENCIES = ("fastapi", "mangum", "httpx", "boto3", "pydantic")
TARGET_LLM_S = 1.0
TOP_MODULES = 8
TOP_PACKAGES = 10

# Run in the fresh interpreter: argv = mode, event file, then the directories to put first
# on sys.path. The clock starts once the event is read and the context stub defined. Mode
# "client-first" creates the DynamoDB client (importing boto3) as get_service() does, just
# before the first invocation, to time that part of it on its own.
CHILD = """
import json, sys, time

mode = sys.argv[1]
with open(sys.argv[2]) as f:
    event = json.load(f)


class Context:  # what Mangum and Hermes read of Lambda's context object
    function_name = "bench-cold-start"
    function_version = "$LATEST"
    memory_limit_in_mb = 256
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:bench-cold-start"

    def get_remaining_time_in_millis(self):
        return 30000


sys.path[:0] = sys.argv[3:]  # as Lambda: /var/task (the function), then the layer
started = time.perf_counter()
import app

imported = time.perf_counter()
if mode == "client-first":
    from hermes.aws import client

    client("dynamodb")
client_s = time.perf_counter() - imported
imported = time.perf_counter()
response = app.handler(event, Context())
invoked = time.perf_counter()
app.handler(event, Context())  # warm: the difference is what the first one set up lazily
warm = time.perf_counter()
with open("/proc/self/status") as status:
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"import_s": imported - started, "invoke_s": invoked - imported,
                  "warm_s": warm - invoked, "client_s": client_s,
                  "status": response.get("statusCode"),
                  "peak_rss_mb": hwm_kb / 1024}))
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
    invoke_s: float  # the first invocation
    warm_s: float  # a second invocation in the same process
    client_s: float  # boto3 import + DynamoDB client, "client-first" mode only
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


def cold_start(
    function: str,
    env: dict[str, str],
    flags: tuple[str, ...] = (),
    site: Path | None = None,
    mode: str = "plain",
) -> tuple[ColdStart, str]:
    """One fresh process: import the function's handler and invoke it. With `site`, the
    interpreter runs without the venv (-S) and imports third-party code from `site` only."""
    fn_dir = ROOT / "functions" / function
    path = [str(fn_dir), str(LAYER)]
    if site is not None:
        flags, path = (*flags, "-S"), [*path, str(site)]
    args = [*flags, "-c", CHILD, mode, str(EVENTS[function]), *path]
    stdout, stderr, elapsed = _python(args, env, fn_dir)
    result = json.loads(stdout.strip().splitlines()[-1])
    if result["status"] != 200:
        raise RuntimeError(f"{function} cold start answered {result['status']}")
    fields = ("import_s", "invoke_s", "warm_s", "client_s")
    return ColdStart(*(result[f] for f in fields), elapsed, result["peak_rss_mb"]), stderr


def medians(
    function: str, env: dict[str, str], runs: int, site: Path | None = None, mode: str = "plain"
) -> ColdStart:
    cold_start(function, env, site=site, mode=mode)  # discarded: warms the page cache
    results = [cold_start(function, env, site=site, mode=mode)[0] for _ in range(runs)]
    return ColdStart(
        *(median([getattr(r, f) for r in results]) for f in ColdStart.__dataclass_fields__)
    )


def _timed_script(script: str, env: dict[str, str], runs: int) -> float:
    """Median of what `script` prints (seconds) over fresh processes, after one discarded."""
    _python(["-c", script], env, ROOT)
    return median([float(_python(["-c", script], env, ROOT)[0]) for _ in range(runs)])


def _report_function(section: Section, function: str, result: ColdStart, runs: int) -> None:
    is_llm = function == "llm"
    section.add(
        f"{function} function: import + first invocation, median of {runs}",
        ms(result.total_s, 0),
        f"≤ {TARGET_LLM_S:g} s" if is_llm else "",
        result.total_s <= TARGET_LLM_S if is_llm else None,
    )
    section.add(
        f"{function} function: import / first invocation / second invocation",
        f"{ms(result.import_s, 0)} / {ms(result.invoke_s, 0)} / {ms(result.warm_s, 1)}",
    )
    section.add(
        f"{function} function: whole process (interpreter start to exit) / its peak RSS",
        f"{ms(result.process_s, 0)} / {result.peak_rss_mb:.1f} MB",
    )


def import_times(stderr: str) -> list[tuple[str, int, float, float]]:
    """`-X importtime` lines → (module, depth, self s, cumulative s)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # two spaces per level after "| "
        rows.append((name.strip(), depth, int(self_us) / 1e6, int(cumulative_us) / 1e6))
    return rows


def import_table(rows: list[tuple[str, int, float, float]]) -> str:
    """Top modules by cumulative time, and the packages whose own code costs most: the sum
    of the self times of a top-level package's modules, so the packages add up to the total."""
    by_cumulative = sorted(rows, key=lambda r: -r[3])[:TOP_MODULES]
    packages: dict[str, float] = {}
    for module, _, self_s, _ in rows:
        top = module.split(".")[0]
        packages[top] = packages.get(top, 0.0) + self_s
    for name in [n for n in packages if n.startswith("_") and n[1:] in packages]:
        packages[name[1:]] += packages.pop(name)  # _awscrt (its C extension) goes with awscrt
    heaviest = sorted(packages.items(), key=lambda p: -p[1])[:TOP_PACKAGES]
    lines = [
        f"Top {TOP_MODULES} modules of the LLM function's cold start (import and first "
        "invocation, the venv's sys.path) by cumulative import time, from one "
        "`python -X importtime` run (depth 0: the handler module `app` itself, or a module "
        "imported lazily during the invocation):",
        "",
        "| module | depth | cumulative | self |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{m}` | {d} | {ms(c, 1)} | {ms(s, 1)} |" for m, d, s, c in by_cumulative]
    lines += [
        "",
        f"All imports of that process took {ms(sum(packages.values()), 0)} (with importtime's "
        f"own overhead). The top {TOP_PACKAGES} top-level packages by the summed self time of "
        "their modules:",
        "",
        "| package | self time of all its modules |",
        "|---|---|",
    ]
    lines += [
        f"| `{package}`{' (stdlib)' if package in sys.stdlib_module_names else ''} "
        f"| {ms(self_s, 1)} |"
        for package, self_s in heaviest
    ]
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
    for function in EVENTS:
        _report_function(section, function, medians(function, env, runs), runs)

    deps = _timed_script(DEPS_CHILD, env, runs)
    section.add(f"bare import of {', '.join(DEPENDENCIES)}, median of {runs}", ms(deps, 0))
    split = medians("llm", env, runs, mode="client-first")
    section.add(
        "llm function: of its first invocation, import boto3 + create the DynamoDB client "
        f"(separate runs, median of {runs})",
        f"{ms(split.client_s, 0)} (then the invocation itself: {ms(split.invoke_s, 0)})",
    )

    site = lambda_path.build(infra.tmp)
    if site is not None:
        lean = medians("llm", env, runs, site)
        section.add(
            f"llm function, Lambda-like sys.path: import + first invocation, median of {runs}",
            f"{ms(lean.total_s, 0)} ({ms(lean.import_s, 0)} + {ms(lean.invoke_s, 0)}; "
            f"peak RSS {lean.peak_rss_mb:.1f} MB)",
        )

    section.extra_markdown = import_table(
        import_times(cold_start("llm", env, ("-X", "importtime"))[1])
    )
    section.note(
        "Each run is a fresh `python -c` process (cwd = the function directory; sys.path "
        "starting with the function directory and layers/hermes, then the venv) against the "
        "emulator and DynamoDB Local with the template's tables; env OLLAMA_URL, "
        "AWS_ENDPOINT_URL_DYNAMODB, HERMES_LEASE_TABLE=LeaseTable and AWS credentials. Events: "
        "events/llm_generate.json and events/status.json, with a Lambda context stub (30 s "
        "left). One unmeasured run first warms the page cache. Interpreter start-up is outside "
        "the target figure and inside the whole-process one."
    )
    section.note(
        "Lambda-like sys.path: `python -S` (no venv) with only the installed packages that "
        "layers/hermes/requirements.txt and the runtime's boto3 need, without extras, "
        "symlinked from the venv. The venv also holds dev tools, and httpx imports its CLI "
        "(rich, click) and botocore imports awscrt and pyOpenSSL just because they are "
        "installed; a deployed function would not pay for those."
    )
    return section
