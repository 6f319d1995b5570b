"""What every instance knows about a host, for placement: one small item per host.

  pk            sk      holds
  host#<host>   host    r:<model>  last time the model was seen resident (epoch ms)
                        lt:<model> its last cold load time (ms)
                        loading    the model of the host's one cold load in progress,
                        loading_until  until when that claim holds (epoch ms)
                        ps_at      when residency was last read from the server itself
                        open_until circuit open until (epoch ms); absent = closed
                        probe_until the one probe of a half-open circuit, claimed until;
                                   the claim is the circuit's epoch: a probe's verdict lands
                                   only while its own claim is current

Kept apart from the pool's state item (`host#<host>` / `state`), which admissions and
releases update in transactions: these single-item writes never conflict with them. Every
write here is a hint that a later read corrects (the server's own /api/ps when stale), except
the two claims (cold load, probe), which are conditional writes: one instance wins each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from hermes.limiter.records import STATE_SK, counters_of, key, n, s, value
from hermes.limiter.table import CONTENDED_CODES, Table, unavailable

HOST_SK = "host"
RESIDENT, LOAD_TIME = "r:", "lt:"


@dataclass(frozen=True)
class HostView:
    """One host as placement sees it: the pool's counters and the host's record."""

    host: str
    counters: dict[str, int] = field(default_factory=dict)
    waiting: int = 0
    resident: dict[str, int] = field(default_factory=dict)  # model -> last seen (epoch ms)
    load_ms: dict[str, int] = field(default_factory=dict)  # model -> last cold load time
    loading: tuple[str, int] | None = None  # (model, until epoch ms)
    ps_at: int = 0
    open_until: int = 0  # 0 = closed
    probe_until: int = 0

    def loading_now(self, now_ms: int) -> str | None:
        """The model whose cold load is in progress, if its claim has not lapsed."""
        if self.loading is not None and self.loading[1] > now_ms:
            return self.loading[0]
        return None


class HostBook:
    def __init__(self, table: Table) -> None:
        self._table = table

    def views(self, pools: dict[str, str], counters: bool = True) -> dict[str, HostView]:
        """{host: view} for `pools` ({host: its pool}), in one BatchGetItem (eventually
        consistent: placement only ranks; the admission transaction is the check).
        `counters=False`: the records alone, for a caller that reads the counters itself."""
        keys = [key(pool, HOST_SK) for pool in pools.values()]
        if counters:
            keys += [key(pool, STATE_SK) for pool in pools.values()]
        items = self._table.batch_get(keys, consistent=False)
        by_key = {(i["pk"]["S"], i["sk"]["S"]): i for i in items}
        return {
            host: _view(host, by_key.get((pool, STATE_SK), {}), by_key.get((pool, HOST_SK), {}))
            for host, pool in pools.items()
        }

    def claim_load(self, pool: str, model: str, now_ms: int, until_ms: int) -> bool:
        """Take the host's one cold-load slot for `model` until `until_ms`; False when another
        load holds it."""
        return self._update(
            pool,
            "SET loading = :m, loading_until = :until",
            {":m": s(model), ":until": n(until_ms), ":now": n(now_ms)},
            condition="attribute_not_exists(loading_until) OR loading_until <= :now "
            "OR loading = :m",
        )

    def resident(
        self,
        pool: str,
        model: str,
        now_ms: int,
        load_ms: int | None = None,
        evicted: Iterable[str] = (),
        loaded: bool = False,
    ) -> None:
        """`model` answered on this host at `now_ms` (after a cold load of `load_ms` when
        given); `evicted` are the models the server dropped to make room, as predicted.
        `loaded`: this instance held the cold-load claim, which ends here."""
        names = {"#r": RESIDENT + model}
        sets = ["#r = :now"]
        values: dict[str, Any] = {":now": n(now_ms)}
        if load_ms is not None:
            names["#lt"] = LOAD_TIME + model
            sets.append("#lt = :lt")
            values[":lt"] = n(load_ms)
        removes = [f"#e{i}" for i, _ in enumerate(evicted)]
        names |= {f"#e{i}": RESIDENT + m for i, m in enumerate(evicted)}
        if loaded:
            removes += ["loading", "loading_until"]
        expression = "SET " + ", ".join(sets) + (f" REMOVE {', '.join(removes)}" if removes else "")
        self._update(pool, expression, values, names=names)

    def forget(self, pool: str, models: Sequence[str]) -> None:
        """`models` are no longer loaded on the host (the server evicts them for a load)."""
        if models:
            names = {f"#e{i}": RESIDENT + m for i, m in enumerate(models)}
            self._update(pool, "REMOVE " + ", ".join(names), None, names=names)

    def end_load(self, pool: str, model: str) -> None:
        """Give up the cold-load claim of `model` (its call failed, or never started)."""
        self._update(
            pool, "REMOVE loading, loading_until", {":m": s(model)}, condition="loading = :m"
        )

    def refreshed(
        self,
        pool: str,
        resident: dict[str, int],
        known: Sequence[str],
        now_ms: int,
        asked_at_ms: int,
    ) -> None:
        """The server itself, asked at `asked_at_ms`, says `resident` ({model: last used,
        epoch ms}) are loaded: every other model in `known` is not. What another instance
        recorded after that question (an answer, a load that ended) is newer, and stays."""
        current = self._table.get(pool, HOST_SK, consistent=True) or {}

        def recorded(model: str) -> int:
            return value(current, RESIDENT + model)

        newer = {m: t for m, t in resident.items() if t > recorded(m)}
        gone = [
            m
            for m in known
            if m not in resident and RESIDENT + m in current and recorded(m) < asked_at_ms
        ]
        names = {f"#r{i}": RESIDENT + m for i, m in enumerate(newer)}
        names |= {f"#g{i}": RESIDENT + m for i, m in enumerate(gone)}
        values = {":now": n(now_ms)} | {f":r{i}": n(t) for i, t in enumerate(newer.values())}
        sets = ["ps_at = :now"] + [f"#r{i} = :r{i}" for i in range(len(newer))]
        removes = [f"#g{i}" for i in range(len(gone))]
        expression = "SET " + ", ".join(sets) + (f" REMOVE {', '.join(removes)}" if removes else "")
        self._update(pool, expression, values, names=names or None)

    def claim_refresh(self, pool: str, now_ms: int, stale_ms: int) -> bool:
        """One instance re-reads a host's residency once it is `stale_ms` old."""
        return self._update(
            pool,
            "SET ps_at = :now",
            {":now": n(now_ms), ":old": n(now_ms - stale_ms)},
            condition="attribute_not_exists(ps_at) OR ps_at < :old",
        )

    def open_circuit(self, pool: str, now_ms: int, until_ms: int, probe: int | None = None) -> bool:
        """Open the host's circuit until `until_ms`; True when this call opened it (it was
        closed, or half-open: its probe failed). `probe`: the failure is that of the probe
        claimed until `probe`, which reopens the circuit only while its claim is the current
        one (a probe thawed after its claim lapsed, or after the circuit closed, changes
        nothing)."""
        condition = "attribute_not_exists(open_until) OR open_until <= :now"
        if probe is not None:
            condition = "probe_until = :probe"
        return self._update(
            pool,
            "SET open_until = :until REMOVE probe_until",
            {":until": n(until_ms), ":now": n(now_ms), ":probe": n(probe or 0)},
            condition=condition,
        )

    def claim_probe(self, pool: str, now_ms: int, until_ms: int) -> bool:
        """The one probe of a half-open circuit (cooldown over), claimed until `until_ms`."""
        return self._update(
            pool,
            "SET probe_until = :until",
            {":until": n(until_ms), ":now": n(now_ms)},
            condition="open_until <= :now AND "
            "(attribute_not_exists(probe_until) OR probe_until <= :now)",
        )

    def close_circuit(self, pool: str, probe: int) -> bool:
        """The probe claimed until `probe` succeeded: close the circuit, unless that claim is
        no longer the current one (it lapsed and another probe decides, or a newer failure
        reopened the circuit). False when nothing changed."""
        return self._update(
            pool,
            "REMOVE open_until, probe_until",
            {":probe": n(probe)},
            condition="probe_until = :probe",
        )

    def _update(
        self,
        pool: str,
        expression: str,
        values: dict[str, Any] | None,
        *,
        names: dict[str, str] | None = None,
        condition: str | None = None,
    ) -> bool:
        kwargs: dict[str, Any] = {
            "TableName": self._table.name,
            "Key": key(pool, HOST_SK),
            "UpdateExpression": expression,
        }
        if values:
            used = {k: v for k, v in values.items() if k in expression or k in (condition or "")}
            if used:
                kwargs["ExpressionAttributeValues"] = used
        if names:
            kwargs["ExpressionAttributeNames"] = names
        if condition:
            kwargs["ConditionExpression"] = condition
        try:
            self._table.send("update_item", kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ConditionalCheckFailedException":
                return False
            if code in CONTENDED_CODES:
                # Throttled: a claim not won, a hint not written; a later write corrects it.
                return False
            raise unavailable(exc.response.get("Error", {}).get("Code", "")) from None
        except BotoCoreError:
            raise unavailable("") from None
        return True


def _view(host: str, state: dict[str, Any], record: dict[str, Any]) -> HostView:
    loading = None
    if "loading" in record and "loading_until" in record:
        loading = (record["loading"]["S"], int(record["loading_until"]["N"]))
    return HostView(
        host=host,
        counters=counters_of(state),
        waiting=value(state, "q_waiting"),
        resident={
            k[len(RESIDENT) :]: int(v["N"]) for k, v in record.items() if k.startswith(RESIDENT)
        },
        load_ms={
            k[len(LOAD_TIME) :]: int(v["N"]) for k, v in record.items() if k.startswith(LOAD_TIME)
        },
        loading=loading,
        ps_at=value(record, "ps_at"),
        open_until=value(record, "open_until"),
        probe_until=value(record, "probe_until"),
    )
