"""`python -m bench.waiting_cost [--quick]`: what ONE waiting request costs a Lambda sandbox.

A request that waits for a model's slot holds a Lambda sandbox for as long as it waits, and
that sandbox's notice poller keeps reading the lease table: the wait is paid in RCU (the
reads) and in the CPU of a 256 MB function, about 0.15 vCPU. Targets (issue 19, item 2):
while waiting, at most 20 DynamoDB reads a second and at most 10 % of that 0.15 vCPU share
(15 ms of CPU per second of waiting), under a CPU quota of that share; and the handoff gap
(from the holder's release to the waiter's admission, holder and waiter in different
processes) at p50 at most 50 ms on DynamoDB Local.

How: DynamoDB Local, the Ollama emulator and a models file with one 1-slot model. The WAITER
is a process of its own (this module with --waiter), a stand-in for one warm sandbox: Hermes'
layer first on sys.path, the service built by `hermes.service.get_service()` from the
environment, tests/support/dynamodb_meter.Meter on the limiter's client (`hermes.aws.client`).
For each run the HOLDER (this process, another "instance") takes the slot with
`Limiter.acquire`, tells the waiter to call `generate` (it waits in the queue: the model's
queue_timeout_ms), holds the slot HOLD_S and releases it, which hands it over. The waiter
reports, from its request's start to its admission: its DynamoDB calls by operation, its CPU
(time.process_time(): every thread of the process) and when it was admitted (time.time(),
the machine's one clock). The runs go twice: the waiter unconfined, then in a cgroup holding
it to 15 ms of CPU per 100 ms (cgroup v1 cpu.cfs_quota_us, or v2 cpu.max)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter as Tally
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from bench.procs import (
    AWS_ENV,
    build_service,
    clean_env,
    dynamodb_client,
    quiet_in_process_hermes,
    write_models_file,
)
from bench.report import load_average
from bench.stats import percentile
from local.dynamodb_local import DynamoDBLocal
from local.process import die_with_parent
from local.template import ROOT
from tests.support.dynamodb_meter import READS, WRITES, Meter
from tests.support.emulator_process import EmulatorProcess

MODEL = "waiting"
MODELS = {
    "models": {
        MODEL: {"max_concurrency": 1, "memory_cost": "low", "timeout": 30000,
                "backend_model": "gemma3:1b", "queue_timeout_ms": 20000},
    },
    "hosts": {"default": {"memory_budget": 8}},
}  # fmt: skip
LEASE_TABLE = "LeaseTable"
DEADLINE_S = 25.0  # what an HTTP invocation may spend (API Gateway ends it at 30 s)
HOLDER_LEASE_MS = 60_000
PERIOD_US, QUOTA_US = 100_000, 15_000  # 0.15 vCPU: a 256 MB Lambda function
TARGET_READS_PER_S = 20
TARGET_CPU_MS_PER_S = 0.10 * QUOTA_US / PERIOD_US * 1000  # 10 % of the share: 15 ms/s
TARGET_GAP_P50_MS = 50
SETTLE_S = 0.5  # the steady wait is measured from this long after the request's start


# -- the waiter: one warm Lambda sandbox, in its own process ---------------------------------


def waiter() -> None:
    """Serve "go" lines from stdin: each is one generate call that waits; answer each with a
    JSON line on the original stdout (Hermes' own prints go to stderr)."""
    sys.path.insert(0, str(ROOT / "layers" / "hermes"))  # as `sam build` lays the layer out
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from hermes.aws import client
    from hermes.service import get_service

    service = get_service()
    meter = Meter(client("dynamodb"))  # the limiter's own client (cached per process)
    light = getattr(service.limiter._table, "light", None)  # calls bypassing boto3
    stamp: dict[str, Any] = {}
    admit = service.admit

    def ops() -> dict[str, int]:
        sent = light.calls if light is not None else {}
        return dict(meter.ops()) | {f"{op} (light)": n for op, n in sent.items()}

    async def admitted(*args: Any, **kwargs: Any) -> Any:
        admission = await admit(*args, **kwargs)
        stamp.update(at=time.time(), cpu=time.process_time(), ops=ops())
        stamp.update(rcu={op: meter.units({op}) for op in READS})
        return admission

    def settled() -> None:
        stamp.update(settled={"at": time.time(), "cpu": time.process_time(), "ops": ops()})

    service.admit = admitted  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()  # one loop for the sandbox's life, as a warm Lambda

    def request() -> dict[str, Any]:
        stamp.clear()
        meter.reset()
        if light is not None:
            light.calls.clear()
        started, cpu = time.time(), time.process_time()
        # Waiting itself, without the request's start (admission refused, ticket, entry):
        # from SETTLE_S after the start to the admission.
        timer = threading.Timer(SETTLE_S, settled)
        timer.start()
        try:
            loop.run_until_complete(
                service.generate(MODEL, {"prompt": "hi"}, deadline_s=DEADLINE_S)
            )
        except Exception as error:
            return {"error": repr(error)}
        finally:
            timer.cancel()
        return {"started": started, "cpu_s": stamp["cpu"] - cpu, **stamp}

    request()  # warm: connections to DynamoDB Local and the emulator
    print(json.dumps({"ready": os.getpid()}), file=out)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print(json.dumps(request()), file=out)


class Waiter:
    """The waiter process, driven over its stdin and stdout."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.waiting_cost", "--waiter"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
            preexec_fn=die_with_parent,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)  # it exited

    def answer(self, timeout_s: float) -> dict[str, Any]:
        with contextlib.suppress(queue.Empty):
            line = self._lines.get(timeout=timeout_s)
            if line is not None:
                found: dict[str, Any] = json.loads(line)
                if "error" not in found:
                    return found
                raise RuntimeError(f"the waiting request failed: {found['error']}")
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the waiter did not answer (its log, {self.log}):\n{tail}")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


# -- the CPU quota ------------------------------------------------------------------------------


class CpuQuota:
    """A cgroup of its own that holds its processes to QUOTA_US of CPU per PERIOD_US."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.problem = ""
        name = f"hermes-bench-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/cpu")
        try:
            # This process's cgroup per controller ("cpu,cpuacct" or "" for v2): the new one
            # goes under it.
            mine = {}
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                mine.update(dict.fromkeys(controllers.split(","), path))
            if (v1 / "cpu.cfs_quota_us").exists():
                self.path = v1 / mine.get("cpu", "/").lstrip("/") / name
                self.path.mkdir()
                (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(QUOTA_US))
            elif "cpu" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split():
                self.path = Path("/sys/fs/cgroup") / mine.get("", "/").lstrip("/") / name
                self.path.mkdir()
                (self.path / "cpu.max").write_text(f"{QUOTA_US} {PERIOD_US}")
            else:
                raise OSError("no cgroup cpu controller (v1 cpu, or cpu in cgroup v2)")
        except OSError as error:
            self.problem = f"no CPU quota ({error})"
            self.remove()
            self.path = None

    def add(self, pid: int) -> None:
        assert self.path is not None
        (self.path / "cgroup.procs").write_text(str(pid))  # every thread of the process

    def throttled(self) -> tuple[int, int, float]:
        """Periods so far, of which throttled, and seconds throttled (cpu.stat)."""
        assert self.path is not None
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        seconds = (
            int(stat.get("throttled_time", 0)) / 1e9 + int(stat.get("throttled_usec", 0)) / 1e6
        )
        return int(stat["nr_periods"]), int(stat["nr_throttled"]), seconds

    def remove(self) -> None:
        for _ in range(50):  # a process that just exited may still be listed for a moment
            if self.path is None or not self.path.exists():
                return
            with contextlib.suppress(OSError):
                self.path.rmdir()
                return
            time.sleep(0.1)
        print(f"  could not remove {self.path}", flush=True)


# -- the measurement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    waited_s: float  # from the request's start to its admission
    ops: Tally[str]  # its DynamoDB calls meanwhile
    rcu: dict[str, float]  # by read operation, as DynamoDB Local reports them
    cpu_s: float
    gap_s: float  # from the holder's release call to the admission
    release_s: float  # the holder's release call
    steady_s: float  # the steady wait: from SETTLE_S after the start to the admission
    steady_ops: Tally[str]
    steady_cpu_s: float

    @property
    def reads(self) -> int:
        return sum(n for op, n in self.ops.items() if op.split()[0] in READS)

    @property
    def steady_reads(self) -> int:
        return sum(n for op, n in self.steady_ops.items() if op.split()[0] in READS)

    @property
    def writes(self) -> int:
        return sum(n for op, n in self.ops.items() if op.split()[0] in WRITES)


class Holder:
    """The slot's holder: another instance, taking and releasing it with the limiter."""

    def __init__(self, endpoint_url: str, models_file: Path, ollama_url: str) -> None:
        from hermes.service import host_pool

        service = build_service(dynamodb_client(endpoint_url), models_file, ollama_url)
        config = service.model(MODEL)
        self.limiter = service.limiter
        self.pool = host_pool(config.host)
        self.counters = service.counters(MODEL, config)

    def handoff(self, waiter: Waiter, hold_s: float) -> Run:
        held = self.limiter.acquire(self.pool, self.counters, HOLDER_LEASE_MS)
        waiter.go()
        time.sleep(hold_s)
        released_at = time.time()
        if not self.limiter.release(held):
            raise RuntimeError("the holder's release failed")
        release_s = time.time() - released_at
        got = waiter.answer(hold_s + DEADLINE_S)
        settled = got["settled"]
        return Run(
            got["at"] - got["started"],
            Tally(got["ops"]),
            got["rcu"],
            got["cpu_s"],
            got["at"] - released_at,
            release_s,
            got["at"] - settled["at"],
            Tally(got["ops"]) - Tally(settled["ops"]),
            got["cpu"] - settled["cpu"],
        )


@dataclass(frozen=True)
class Result:
    label: str
    runs: list[Run]
    throttled: str = ""  # under the quota: how often the cgroup was throttled


def measure(holder: Holder, env: dict[str, str], tmp: Path, args: Any, quota: bool) -> Result:
    label = "0.15 vCPU quota" if quota else "no quota"
    print(f"\n== waiter process, {label}", flush=True)
    waiter = Waiter(env, tmp / f"waiter-{'quota' if quota else 'free'}.log")
    cgroup = None
    try:
        pid = waiter.answer(90)["ready"]
        if quota:
            cgroup = CpuQuota()
            if cgroup.path is None:
                print(f"  {cgroup.problem}: measuring without it", flush=True)
                label, cgroup = f"quota not applied ({cgroup.problem})", None
            else:
                cgroup.add(pid)
                print(f"  pid {pid} in {cgroup.path}: {QUOTA_US} µs per {PERIOD_US} µs")
        holder.handoff(waiter, 0.5)  # not counted: the first wait runs code for the first time
        before = cgroup.throttled() if cgroup else (0, 0, 0.0)
        runs = []
        for number in range(1, args.runs + 1):
            run = holder.handoff(waiter, args.hold_s)
            runs.append(run)
            print(
                f"  run {number:2}/{args.runs}: waited {run.waited_s:.2f} s, {run.reads} reads, "
                f"CPU {run.cpu_s * 1000:.0f} ms; steady {run.steady_s:.2f} s: "
                f"{run.steady_reads / run.steady_s:.1f} reads/s, "
                f"{run.steady_cpu_s / run.steady_s * 1000:.1f} ms CPU/s; "
                f"gap {run.gap_s * 1000:.1f} ms",
                flush=True,
            )
        throttled = ""
        if cgroup:
            periods, hit, seconds = (a - b for a, b in zip(cgroup.throttled(), before, strict=True))
            throttled = f"{hit:g} of {periods:g} periods, {seconds:.1f} s in all"
        return Result(label, runs, throttled)
    finally:
        waiter.stop()
        if cgroup:
            cgroup.remove()


def figures(result: Result) -> dict[str, tuple[str, bool | None]]:
    """Each figure as (text, met its target or None) for one column of the table."""
    runs = result.runs
    waited = sum(r.waited_s for r in runs)
    steady = sum(r.steady_s for r in runs)
    reads = [r.steady_reads / r.steady_s for r in runs]
    cpu = [r.steady_cpu_s / r.steady_s * 1000 for r in runs]
    gaps = [r.gap_s * 1000 for r in runs]
    ops = sum((r.steady_ops for r in runs), Tally())
    by_op = ", ".join(
        f"{op} {n / steady:.1f}" for op, n in ops.most_common() if op.split()[0] in READS
    )
    gap_p50 = percentile(gaps, 50)
    rows: dict[str, tuple[str, bool | None]] = {
        "handoffs measured, wait each (mean)": (
            f"{len(runs)}, {waited / len(runs):.2f} s",
            None,
        ),
        "reads/s while waiting (from 0.5 s in), mean / max": (
            f"{mean(reads):.1f} / {max(reads):.1f}",
            max(reads) <= TARGET_READS_PER_S,
        ),
        "reads/s by operation (mean)": (by_op, None),
        "RCU/s of the boto3 reads, the whole request (DynamoDB Local's count)": (
            f"{sum(sum(r.rcu.values()) for r in runs) / waited:.1f}",
            None,
        ),
        "writes while waiting, per request": (
            f"{mean(r.writes for r in runs):g}",
            None,
        ),
        "CPU ms per s of waiting (from 0.5 s in), mean / max": (
            f"{mean(cpu):.1f} / {max(cpu):.1f}",
            max(cpu) <= TARGET_CPU_MS_PER_S,
        ),
        "handoff gap, p50 / p95": (
            f"{gap_p50:.1f} / {percentile(gaps, 95):.1f} ms",
            gap_p50 <= TARGET_GAP_P50_MS,
        ),
        "holder's release call (in the gap), p50": (
            f"{percentile([r.release_s * 1000 for r in runs], 50):.1f} ms",
            None,
        ),
        "throttled by the quota": (result.throttled or "—", None),
    }
    return rows


TARGETS = {
    "reads/s while waiting (from 0.5 s in), mean / max": f"max ≤ {TARGET_READS_PER_S}",
    "CPU ms per s of waiting (from 0.5 s in), mean / max": (
        f"max ≤ {TARGET_CPU_MS_PER_S:g} (10 % of 0.15 vCPU)"
    ),
    "handoff gap, p50 / p95": f"p50 ≤ {TARGET_GAP_P50_MS} ms",
}


def table(results: list[Result]) -> str:
    columns = [figures(result) for result in results]
    lines = [
        "| figure | " + " | ".join(r.label for r in results) + " | target |",
        "|---|" + "---|" * len(results) + "---|",
    ]
    for name in columns[0]:
        cells = []
        for column in columns:
            text, ok = column[name]
            cells.append(text if ok is None else f"{text} {'PASS' if ok else 'MISS'}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {TARGETS.get(name, '—')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.waiting_cost", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 handoffs of 1 s per waiter")
    parser.add_argument("--runs", type=int, help="handoffs per waiter (default 20; quick 5)")
    parser.add_argument("--hold-s", type=float, help="seconds held each (default 2; quick 1)")
    parser.add_argument("--waiter", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.waiter:
        waiter()
        return
    args.runs = args.runs or (5 if args.quick else 20)
    args.hold_s = args.hold_s or (1.0 if args.quick else 2.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop through the ExitStack
    quiet_in_process_hermes()
    load_at_start = load_average()  # other work on the machine's CPUs changes every figure
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hermes-waiting-")))
        print("  starting DynamoDB Local and the Ollama emulator", flush=True)
        store = DynamoDBLocal().start()
        stack.callback(store.stop)
        store.create_tables()
        emulator = stack.enter_context(EmulatorProcess())
        models_file = write_models_file(tmp, "models.json", MODELS)
        holder = Holder(store.url, models_file, emulator.url)
        for _ in range(100):  # DynamoDB Local's JVM answers its first requests slowly
            holder.limiter.release(holder.limiter.acquire(holder.pool, holder.counters, 1000))
        env = clean_env(
            **AWS_ENV,
            AWS_ENDPOINT_URL_DYNAMODB=store.url,
            OLLAMA_URL=emulator.url,
            HERMES_MODELS_FILE=str(models_file),
            HERMES_LEASE_TABLE=LEASE_TABLE,
            POWERTOOLS_METRICS_DISABLED="true",
            POWERTOOLS_LOG_LEVEL="WARNING",
        )
        results = [measure(holder, env, tmp, args, quota) for quota in (False, True)]
    print(f"\n== What one waiting request costs ({args.runs} handoffs of {args.hold_s:g} s)")
    print(f"load average (1 min), start / end: {load_at_start} / {load_average()}")
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
