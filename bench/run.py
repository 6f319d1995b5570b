"""`python -m bench.run [--quick] [--only SECTION]`: run the benchmark, print figures as
they come and rewrite bench/RESULTS.md.

Sections: 1 latency, 2 memory, 3 dynamodb, 4 utilization, 5 coldstart, 6 real_model,
7 placement, 8 conflicts. Memory has no load of its own: it reads the runners that sections
1 and 4 load, so `--only memory` runs those two as well."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench import (
    coldstart,
    conflicts,
    dynamodb,
    latency,
    memory,
    placement,
    real_model,
    utilization,
)
from bench.procs import Infra, quiet_in_process_hermes
from bench.report import RunInfo, Section, banner, write_results
from bench.scale import FULL, QUICK, Scale

RESULTS = Path(__file__).with_name("RESULTS.md")

SectionRun = Callable[[Infra, Scale, memory.MemoryLog], Section]
# In execution order; the memory section is assembled from readings at the end.
RUNS: dict[str, tuple[str, SectionRun]] = {
    "latency": ("1. Added latency", latency.run),
    "dynamodb": ("3. DynamoDB requests per admitted request", dynamodb.run),
    "utilization": ("4. Slot utilization and fairness under saturation", utilization.run),
    "coldstart": ("5. Cold start", coldstart.run),
    "real_model": ("6. Real model", real_model.run),
    "placement": ("7. Model placement across hosts", placement.run),
    "conflicts": ("8. Admission under transaction conflicts", conflicts.run),
}
NAMES = [
    "latency",
    "memory",
    "dynamodb",
    "utilization",
    "coldstart",
    "real_model",
    "placement",
    "conflicts",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter runs")
    parser.add_argument(
        "--only",
        metavar="SECTION",
        choices=[*NAMES, *map(str, range(1, len(NAMES) + 1))],
        help="one section: " + ", ".join(f"{i} {n}" for i, n in enumerate(NAMES, 1)),
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="default bench/RESULTS.md")
    return parser.parse_args(argv)


def selected(only: str | None) -> list[str]:
    if only is None:
        return NAMES
    name = NAMES[int(only) - 1] if only.isdigit() else only
    return ["latency", "memory", "utilization"] if name == "memory" else [name]


def main(argv: list[str] | None = None) -> None:
    # SIGTERM ends the run like Ctrl-C: through the ExitStack, which stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL
    names = selected(args.only)
    quiet_in_process_hermes()
    info = RunInfo(" ".join(["python -m bench.run", *argv]))
    started = time.monotonic()
    sections: list[Section] = []
    log = memory.MemoryLog()
    with ExitStack() as stack:
        infra = Infra(stack, args.output.parent)
        for name, (title, run) in RUNS.items():
            if name in names:
                banner(title)
                sections.append(run(infra, scale, log))
        if "memory" in names:
            banner("2. Peak memory")
            sections.append(memory.section(log))
    duration = time.monotonic() - started
    write_results(args.output, info, duration, sections)
    print("\n== Summary")
    for section in sorted(sections, key=lambda s: s.number):
        for row in section.rows:
            if row.ok is not None:
                print(
                    f"  {row.verdict}  {section.number}. {row.metric}: {row.value} ({row.target})"
                )
    print(f"\nwrote {args.output} ({duration:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
