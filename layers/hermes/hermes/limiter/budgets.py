"""A caller's token and request budgets, reserved before the call, exact across instances.

Each budget is a counter item per caller and fixed UTC window (`caller#<id>#budget` /
`tpm#<minute>`, `tpd#<YYYY-MM-DD>`, `rpm#<minute>`): a reservation ADDs to every window that
applies, conditional on each staying within its limit, in one transaction (together or not
at all). A request reserves its prompt's tokens (an upper bound) plus its output cap before
its slot is asked for; when it ends, `settle` ADDs the difference to what the backend
reported (usually negative: the rest comes back) to the same windows, so a window counts
what was really used. A request that never ran gives everything back, its request included.
A crash between the two costs the caller its reservation until the window ends (a minute,
or the UTC day). The window items carry `ttl` (the table's TTL attribute), a day after
their window: nothing depends on when DynamoDB deletes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from hermes.errors import InvalidRequest, QuotaExceeded
from hermes.limiter.records import key, n
from hermes.limiter.table import Cancelled, Contended, Table

log = logging.getLogger("hermes.limiter")

DAY_S = 86_400
WINDOW_TTL_S = DAY_S  # kept a day after the window ends (usage reads may look back)
# How long a reservation or settlement rides out contention (the window items are hot when
# one caller sends many requests at once).
PATIENCE_S = 2.0


@dataclass(frozen=True)
class Window:
    limit_name: str  # tokens_per_minute, tokens_per_day, requests_per_minute
    limit: int
    sk: str
    ends_at: float  # epoch s

    @property
    def tokens(self) -> bool:
        return self.limit_name.startswith("tokens")


@dataclass(frozen=True)
class Reservation:
    caller: str
    tokens: int
    windows: tuple[Window, ...]


class Budgets:
    def __init__(self, table: Table) -> None:
        self._table = table

    def reserve(
        self,
        caller: str,
        tokens: int,
        tokens_per_minute: int | None,
        tokens_per_day: int | None,
        requests_per_minute: int | None,
    ) -> Reservation:
        """Reserve `tokens` and one request in every window the limits name, or raise
        QuotaExceeded (429, Retry-After: the window's end) naming the limit and the caller;
        InvalidRequest when `tokens` exceeds a whole window's limit (no wait would help)."""
        now = self._table.clock()
        minute, day = int(now // 60), time.strftime("%Y-%m-%d", time.gmtime(now))
        day_ends = (int(now // DAY_S) + 1) * DAY_S
        windows = tuple(
            Window(name, limit, sk, ends)
            for name, limit, sk, ends in (
                ("tokens_per_minute", tokens_per_minute, f"tpm#{minute}", (minute + 1) * 60),
                ("tokens_per_day", tokens_per_day, f"tpd#{day}", day_ends),
                ("requests_per_minute", requests_per_minute, f"rpm#{minute}", (minute + 1) * 60),
            )
            if limit is not None
        )
        for window in windows:
            if window.tokens and tokens > window.limit:
                raise InvalidRequest(
                    f"this request may use up to {tokens} tokens (its prompt and its output "
                    f"cap), more than caller '{caller}' may use at all ({window.limit_name} "
                    f"{window.limit}); send a smaller num_predict / max_tokens or prompt"
                )
        if windows:
            self._add(caller, windows, tokens, 1, conditional=True)
        return Reservation(caller, tokens, windows)

    def settle(self, reservation: Reservation, used_tokens: int | None, ran: bool) -> None:
        """The call ended: its windows count `used_tokens` (None: unknown, the reservation
        stays whole) instead of the reservation; a call that never `ran` gives back its
        tokens and its request. Never raises: a settlement that fails leaves the reservation
        counted (the caller loses, never the limit)."""
        if not reservation.windows:
            return
        tokens = 0 if not ran else reservation.tokens if used_tokens is None else used_tokens
        if tokens == reservation.tokens and ran:
            return
        try:
            self._add(
                reservation.caller,
                reservation.windows,
                tokens - reservation.tokens,
                0 if ran else -1,
                conditional=False,
            )
        except Exception as error:  # the limit still holds: only the caller is short
            log.warning("settling the budget of caller %s failed: %r", reservation.caller, error)

    def _add(
        self,
        caller: str,
        windows: tuple[Window, ...],
        tokens: int,
        requests: int,
        conditional: bool,
    ) -> None:
        items, charged = [], []
        for window in windows:
            amount = tokens if window.tokens else requests
            if not conditional and amount == 0:
                continue  # a settlement leaves the request count of a call that ran
            update: dict[str, Any] = {
                "TableName": self._table.name,
                "Key": key(f"caller#{caller}#budget", window.sk),
                "UpdateExpression": "ADD n :amount SET #ttl = if_not_exists(#ttl, :ttl)",
                "ExpressionAttributeNames": {"#ttl": "ttl"},
                "ExpressionAttributeValues": {
                    ":amount": n(amount),
                    ":ttl": n(int(window.ends_at) + WINDOW_TTL_S),
                },
            }
            if conditional:
                update["ConditionExpression"] = "attribute_not_exists(n) OR n <= :room"
                update["ExpressionAttributeValues"][":room"] = n(window.limit - amount)
                update["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
            items.append(update)
            charged.append(window)
        backoff = self._table.backoff(PATIENCE_S)
        while items:
            try:
                if len(items) == 1:
                    self._table.update(items[0])
                else:
                    self._table.transact([{"Update": item} for item in items])
                return
            except Cancelled as cancelled:
                index = next(
                    (i for i in range(len(items)) if cancelled.failed(i)), 0
                )  # a single update's Cancelled has the one reason
                raise self._exceeded(caller, charged[index], cancelled.item(index)) from None
            except Contended:
                if not backoff.wait():
                    raise

    def _exceeded(self, caller: str, window: Window, seen: dict[str, Any]) -> QuotaExceeded:
        used = int(seen.get("n", {}).get("N", "0"))
        what = "tokens" if window.tokens else "requests"
        span = "UTC day" if window.limit_name.endswith("day") else "UTC minute"
        retry_after = max(1, int(window.ends_at - self._table.clock()) + 1)
        return QuotaExceeded(
            f"caller '{caller}' has used {used} of its {window.limit_name} {window.limit} "
            f"{what} this {span}; retry after {retry_after} s",
            retry_after=retry_after,
            limit=window.limit_name,
            caller=caller,
        )
