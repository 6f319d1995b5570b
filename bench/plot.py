"""The pictures: section 4, wait per request and requests in flight at the emulator over time;
section 7, model loads and latency per placement strategy.
matplotlib with the Agg backend (files only, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

TARGET_WAIT_P99 = 1.5  # x the ideal FIFO wait, drawn as a line


class Request(Protocol):
    """One answered request, wall-clock seconds."""

    client: int
    sent: float
    entered: float  # the emulator began its answer
    left: float  # the emulator ended it

    @property
    def wait(self) -> float: ...


def in_flight_steps(requests: Sequence[Request]) -> tuple[list[float], list[int]]:
    """The step function of requests in flight at the emulator: (times, count from then on)."""
    events = sorted(
        [(r.entered, 1) for r in requests] + [(r.left, -1) for r in requests],
        key=lambda e: (e[0], e[1]),  # at equal times a leave comes first
    )
    times, counts, current = [], [], 0
    for at, delta in events:
        current += delta
        times.append(at)
        counts.append(current)
    return times, counts


def plot_fairness(
    path: Path,
    requests: Sequence[Request],
    started: float,
    window_end: float,
    slots: int,
    ideal_wait_s: float,
    title: str,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (above, below) = plt.subplots(
        2, 1, figsize=(11, 7), sharex=True, height_ratios=[3, 1.4], constrained_layout=True
    )
    colours: Any = plt.get_cmap("tab20")
    clients = sorted({r.client for r in requests})
    for i, client in enumerate(clients):
        mine = [r for r in requests if r.client == client]
        above.scatter(
            [r.sent - started for r in mine],
            [r.wait * 1000 for r in mine],
            s=14,
            color=colours(i % 20),
            label=f"client {client + 1}",
            alpha=0.85,
            linewidths=0,
        )
    above.axhline(ideal_wait_s * 1000, color="black", linestyle="--", linewidth=1)
    above.axhline(TARGET_WAIT_P99 * ideal_wait_s * 1000, color="red", linestyle=":", linewidth=1)
    above.annotate(
        f"ideal FIFO wait {ideal_wait_s * 1000:.0f} ms",
        (0, ideal_wait_s * 1000),
        xytext=(4, 3),
        textcoords="offset points",
        fontsize=8,
    )
    above.annotate(
        f"target for p99: {TARGET_WAIT_P99:g} x ideal",
        (0, TARGET_WAIT_P99 * ideal_wait_s * 1000),
        xytext=(4, 3),
        textcoords="offset points",
        fontsize=8,
        color="red",
    )
    above.set_ylabel("wait (ms): sent → emulator starts")
    above.set_ylim(bottom=0)
    above.set_title(title, fontsize=10)
    above.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    above.grid(alpha=0.3)

    times, counts = in_flight_steps(requests)
    below.step([t - started for t in times], counts, where="post", linewidth=0.8)
    below.axhline(slots, color="red", linestyle=":", linewidth=1, label=f"limit ({slots})")
    below.set_ylabel("in flight at\nthe emulator")
    below.set_xlabel("seconds since the run started")
    below.set_ylim(0, slots + 1)
    below.set_yticks(range(slots + 2))
    below.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    below.grid(alpha=0.3)
    end = max([window_end, *(r.left for r in requests)]) - started
    for axes in (above, below):
        axes.axvspan(window_end - started, end, color="grey", alpha=0.15, linewidth=0)
        axes.set_xlim(0, end)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_placement(
    path: Path,
    latencies: dict[str, Sequence[float]],
    loads_per_1000: dict[str, float],
    title: str,
) -> Path:
    """Section 7: per placement strategy, model loads per 1,000 requests, p50 / p95 latency,
    and the latency distribution (seconds in, milliseconds drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.stats import percentile

    strategies = list(latencies)
    colours = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(strategies)}
    figure, (loads, bars, cdf) = plt.subplots(
        1, 3, figsize=(13, 4.2), width_ratios=[1, 1.3, 1.7], constrained_layout=True
    )
    heights = [loads_per_1000[s] for s in strategies]
    drawn = loads.bar(strategies, heights, color=[colours[s] for s in strategies])
    loads.bar_label(drawn, fmt="%.0f", fontsize=8)
    if "random" in loads_per_1000:
        target = loads_per_1000["random"] / 3
        loads.axhline(target, color="red", linestyle=":", linewidth=1)
        loads.annotate(
            "target: ⅓ of random",
            (len(strategies) - 0.6, target),
            xytext=(0, 3),
            ha="right",
            textcoords="offset points",
            fontsize=7,
            color="red",
        )
    loads.set_ylabel("model loads per 1,000 requests")
    loads.grid(axis="y", alpha=0.3)

    width = 0.38
    for i, s in enumerate(strategies):
        p50 = percentile(latencies[s], 50) * 1000
        p95 = percentile(latencies[s], 95) * 1000
        pair = bars.bar([i - width / 2, i + width / 2], [p50, p95], width, color=colours[s])
        pair[1].set_alpha(0.55)
        bars.bar_label(pair, labels=[f"p50\n{p50:.0f}", f"p95\n{p95:.0f}"], fontsize=7)
    bars.set_xticks(range(len(strategies)), strategies)
    bars.set_ylabel("latency (ms)")
    bars.margins(y=0.2)
    bars.grid(axis="y", alpha=0.3)

    for s in strategies:
        ordered = sorted(v * 1000 for v in latencies[s])
        fractions = [(k + 1) / len(ordered) for k in range(len(ordered))]
        cdf.step(ordered, fractions, where="post", color=colours[s], label=s, linewidth=1.2)
    cdf.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    cdf.set_xscale("log")
    cdf.set_xlabel("latency (ms, log scale)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_ylim(0, 1.01)
    cdf.legend(fontsize=8, loc="lower right")
    cdf.grid(alpha=0.3, which="both")
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_ceiling(
    path: Path,
    callers: Sequence[int],
    series: dict[str, Sequence[float]],
    target: float,
    title: str,
) -> Path:
    """Section 8: admissions per second one host sustains, per number of concurrent callers,
    for each way of admitting (one line each), with the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for label, values in series.items():
        axes.plot(callers, values, marker="o", label=label)
        for x, y in zip(callers, values, strict=True):
            axes.annotate(f"{y:.0f}", (x, y), xytext=(0, 5), textcoords="offset points",
                          ha="center", fontsize=7)  # fmt: skip
    axes.axhline(target, color="red", linestyle=":", linewidth=1, label=f"target {target:g}/s")
    axes.set_xscale("log")
    axes.set_xticks(list(callers), [str(c) for c in callers])
    axes.set_xlabel("concurrent callers (each its own Limiter: a Lambda instance)")
    axes.set_ylabel("admissions (admit + release) per second, one host")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    axes.set_title(title, fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
