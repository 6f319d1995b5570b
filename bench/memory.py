"""Section 2: peak RSS of Hermes runner processes, read by the sections that load them
(1 and 4) while those runners are still alive."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.report import Section

TARGET_MB = 150.0


@dataclass(frozen=True)
class Reading:
    label: str
    peak_mb: float
    detail: str
    targeted: bool  # False: a comparison figure, reported without a verdict


@dataclass
class MemoryLog:
    readings: list[Reading] = field(default_factory=list)

    def record(self, label: str, peak_mb: float, detail: str = "", targeted: bool = True) -> None:
        self.readings.append(Reading(label, peak_mb, detail, targeted))
        print(f"  peak RSS, {label}: {peak_mb:.1f} MB", flush=True)


def section(log: MemoryLog) -> Section:
    result = Section(2, "Peak memory (VmHWM of the runner process)")
    for r in log.readings:
        value = f"{r.peak_mb:.1f} MB" + (f" ({r.detail})" if r.detail else "")
        if r.targeted:
            result.add(f"peak RSS, {r.label}", value, f"≤ {TARGET_MB:g} MB", r.peak_mb <= TARGET_MB)
        else:
            result.add(f"peak RSS, {r.label}", value)
    result.note(
        "VmHWM from /proc/<pid>/status of the `python -m local.runner` process only. Besides "
        "Hermes it hosts uvicorn, every function's FastAPI app (LLM, status, jobs, Ollama- and "
        "OpenAI-compatible APIs), the SQS worker's poller thread and an in-process moto server "
        "for the jobs queue (and, with HERMES_LOCAL_STORE=moto, for DynamoDB too). A deployed "
        "Lambda instance loads one function. DynamoDB Local's JVM is a separate process and is "
        "not counted."
    )
    return result
