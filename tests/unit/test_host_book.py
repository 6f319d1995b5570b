"""The shared host records placement reads and writes (hermes.limiter.hosts), on moto."""

from __future__ import annotations

import boto3

from hermes.limiter import Limiter
from hermes.limiter.hosts import HostBook
from tests.support.dynamodb_limits import ExpressionWatch

POOL = "host#gpu1"
T = 1_800_000_000_000  # an epoch ms


def book(watch: ExpressionWatch) -> HostBook:
    return Limiter(watch.watch(boto3.client("dynamodb")), "LeaseTable").hosts


def test_one_cold_load_per_host_at_a_time_and_a_lapsed_claim_frees_it(
    aws: None, dynamodb_limits: ExpressionWatch
) -> None:
    hosts = book(dynamodb_limits)
    assert hosts.claim_load(POOL, "gemma", T, T + 5_000)
    assert hosts.claim_load(POOL, "gemma", T + 1, T + 5_000)  # the same model joins its load
    assert not hosts.claim_load(POOL, "mistral", T + 10, T + 5_010)  # a second load: no
    assert hosts.views({"gpu1": POOL})["gpu1"].loading_now(T + 10) == "gemma"
    assert hosts.claim_load(POOL, "mistral", T + 5_000, T + 9_000)  # gemma's claim lapsed
    hosts.end_load(POOL, "gemma")  # not gemma's any more: leaves mistral's claim alone
    assert hosts.views({"gpu1": POOL})["gpu1"].loading == ("mistral", T + 9_000)
    hosts.end_load(POOL, "mistral")  # its call failed: the host may load again at once
    assert hosts.views({"gpu1": POOL})["gpu1"].loading is None
    assert hosts.claim_load(POOL, "mistral", T + 5_001, T + 9_000)
    hosts.resident(POOL, "mistral", T + 6_000, load_ms=900, evicted=["gemma"], loaded=True)
    view = hosts.views({"gpu1": POOL})["gpu1"]
    assert view.loading is None and view.resident == {"mistral": T + 6_000}
    assert view.load_ms == {"mistral": 900}


def test_a_refresh_replaces_what_the_records_say_is_loaded(
    aws: None, dynamodb_limits: ExpressionWatch
) -> None:
    hosts = book(dynamodb_limits)
    hosts.resident(POOL, "gemma", T)
    hosts.resident(POOL, "llama3", T)
    assert hosts.claim_refresh(POOL, T + 40_000, stale_ms=30_000)
    assert not hosts.claim_refresh(POOL, T + 41_000, stale_ms=30_000)  # one instance refreshes
    hosts.resident(POOL, "qwen", T + 39_500)  # an answer recorded after the server was asked
    hosts.refreshed(
        POOL,
        {"mistral": T + 39_000, "qwen": T + 20_000},
        ["gemma", "llama3", "mistral", "qwen", "phi"],
        T + 40_000,
        asked_at_ms=T + 39_000,
    )
    view = hosts.views({"gpu1": POOL})["gpu1"]
    # gemma and llama3 are gone; qwen keeps its newer time; phi was never there
    assert view.resident == {"mistral": T + 39_000, "qwen": T + 39_500}
    assert view.ps_at == T + 40_000
    hosts.resident(POOL, "gemma", T + 41_000)  # loaded while the server was being asked
    hosts.refreshed(POOL, {}, ["gemma", "mistral"], T + 42_000, asked_at_ms=T + 40_500)
    view = hosts.views({"gpu1": POOL})["gpu1"]
    assert view.resident == {"gemma": T + 41_000, "qwen": T + 39_500}


def test_a_circuit_opens_once_then_one_probe_decides(
    aws: None, dynamodb_limits: ExpressionWatch
) -> None:
    hosts = book(dynamodb_limits)
    assert hosts.open_circuit(POOL, T, T + 10_000)
    assert not hosts.open_circuit(POOL, T + 1, T + 10_001)  # already open: counted once
    assert not hosts.claim_probe(POOL, T + 5_000, T + 15_000)  # still cooling down
    assert hosts.claim_probe(POOL, T + 10_000, T + 20_000)
    assert not hosts.claim_probe(POOL, T + 10_001, T + 20_001)  # one probe at a time
    # The probe failed: it opens the circuit again.
    assert hosts.open_circuit(POOL, T + 10_500, T + 20_500, probe=T + 20_000)
    assert hosts.views({"gpu1": POOL})["gpu1"].probe_until == 0
    assert hosts.claim_probe(POOL, T + 20_500, T + 30_500)
    assert hosts.close_circuit(POOL, probe=T + 30_500)
    view = hosts.views({"gpu1": POOL})["gpu1"]
    assert view.open_until == 0 and view.probe_until == 0


def test_a_stale_probe_changes_nothing(aws: None, dynamodb_limits: ExpressionWatch) -> None:
    """A probe whose sandbox froze mid-call and thawed later: its claim lapsed and another
    probe took over, or the circuit closed, or it reopened for a newer failure. Its verdict,
    success or failure, lands only while its own claim is the current one."""
    hosts = book(dynamodb_limits)
    hosts.open_circuit(POOL, T, T + 10_000)
    stale = T + 20_000
    assert hosts.claim_probe(POOL, T + 10_000, stale)
    assert hosts.claim_probe(POOL, T + 20_000, T + 30_000)  # the stale claim lapsed
    assert not hosts.close_circuit(POOL, probe=stale)
    assert not hosts.open_circuit(POOL, T + 21_000, T + 31_000, probe=stale)
    assert hosts.views({"gpu1": POOL})["gpu1"].probe_until == T + 30_000
    assert hosts.close_circuit(POOL, probe=T + 30_000)  # the current probe decides
    # Closed now (the host is healthy): the stale probe's timeout, firing on thaw, does not
    # reopen it.
    assert not hosts.open_circuit(POOL, T + 40_000, T + 50_000, probe=stale)
    assert hosts.views({"gpu1": POOL})["gpu1"].open_until == 0
    # Reopened for a newer failure: a stale success does not close it.
    assert hosts.open_circuit(POOL, T + 41_000, T + 51_000)
    assert not hosts.close_circuit(POOL, probe=stale)
    assert hosts.views({"gpu1": POOL})["gpu1"].open_until == T + 51_000


def test_views_read_counters_and_records_of_every_host_in_one_request(
    aws: None, dynamodb_limits: ExpressionWatch
) -> None:
    client = boto3.client("dynamodb")
    calls: list[str] = []
    client.meta.events.register(
        "before-call.dynamodb.*", lambda model, **_: calls.append(model.name)
    )
    hosts = Limiter(dynamodb_limits.watch(client), "LeaseTable").hosts
    hosts.resident("host#gpu2", "gemma", T)
    calls.clear()
    views = hosts.views({f"gpu{i}": f"host#gpu{i}" for i in (1, 2, 3)})
    assert calls == ["BatchGetItem"]
    assert views["gpu2"].resident == {"gemma": T} and views["gpu1"].resident == {}
