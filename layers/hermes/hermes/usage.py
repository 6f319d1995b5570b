"""Who used what: a row per caller, model and UTC day (GET /v1/usage).

Each request that ran or was refused ADDs to its row once, when it ends (`Usage.record`):
one UpdateItem on the usage table, never on the limiter's hot items, sent beside the
settlement of the caller's budget. Rows count
- `requests`: calls that reached a backend (a call retried on another host counts once),
- `prompt_tokens`, `completion_tokens`: what the backend reported (a stream cut before its
  last object reports none),
- `slot_seconds`: how long the request held its slot,
- `refused`: requests answered 429 by a limit (busy, queue full, caller busy, quota; a job's
  attempt that is put back counts too). Bad requests (4xx other than 429) are not counted.
A row is written after the answer is made and before the invocation returns (Lambda freezes
a sandbox when its handler returns); a write that fails is logged and costs only the row's
accuracy, never the answer.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hermes.callers import CALLER, given_caller
from hermes.errors import Forbidden, HermesError, InvalidRequest, LimiterUnavailable
from hermes.limiter.records import n
from hermes.limiter.table import Contended, Table

if TYPE_CHECKING:
    from hermes.service import HermesService

log = logging.getLogger("hermes.usage")

# How long a row's write rides out throttling (the answer is already made: it waits for this).
PATIENCE_S = 2.0
# What one GET /v1/usage may span, and return.
MAX_DAYS = 366
DEFAULT_DAYS = 31
MAX_ROWS = 10_000
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "slot_ms", "refused")


@dataclass
class Tally:
    """One request's usage, filled in as it goes and written once when it ends."""

    caller: str
    model: str
    ran: bool = False
    slot_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refused: bool = False

    def ended(self, answer: dict[str, Any] | None, error: BaseException | None) -> None:
        """What the backend reported (its last object), or the limit that refused it."""
        if answer:
            self.prompt_tokens = int(answer.get("prompt_eval_count") or 0)
            self.completion_tokens = int(answer.get("eval_count") or 0)
        if isinstance(error, HermesError) and error.status == 429 and not self.ran:
            self.refused = True

    @property
    def counted(self) -> bool:
        return self.ran or self.refused


def day_of(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch_s))


class Usage:
    def __init__(self, table: Table, name: str) -> None:
        self._table = table
        self.name = name

    def record(self, tally: Tally) -> None:
        """ADD the request to its caller's row of the day (created by the first). Never raises."""
        if not tally.counted:
            return
        day = day_of(self._table.clock())
        amounts = {
            "requests": int(tally.ran),
            "prompt_tokens": tally.prompt_tokens,
            "completion_tokens": tally.completion_tokens,
            "slot_ms": round(tally.slot_s * 1000),
            "refused": int(tally.refused),
        }
        names = {f"#{name}": name for name in (*COUNTS, "model", "day")}
        values = {f":{name}": n(amount) for name, amount in amounts.items()}
        request = {
            "TableName": self.name,
            "Key": {"caller": {"S": tally.caller}, "sk": {"S": f"{day}#{tally.model}"}},
            "UpdateExpression": "ADD "
            + ", ".join(f"#{name} :{name}" for name in COUNTS)
            + " SET #model = :model, #day = :day",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values
            | {":model": {"S": tally.model}, ":day": {"S": day}},
        }
        backoff = self._table.backoff(PATIENCE_S)
        while True:
            try:
                self._table.update(request)
                return
            except Contended:
                if backoff.wait():
                    continue
                log.warning("usage of %s on %s not recorded: throttled", tally.caller, tally.model)
                return
            except Exception as error:  # the answer is made: only the row is short
                log.warning("usage of %s on %s not recorded: %r", tally.caller, tally.model, error)
                return

    def rows(
        self, caller: str | None, model: str | None, first: str, last: str
    ) -> list[dict[str, Any]]:
        """The rows of days `first`..`last` (inclusive, YYYY-MM-DD): of `caller` (a Query of
        its partition), or of every caller (None: a Scan, for admins), of `model` or all."""
        names = {"#day": "day"}
        values: dict[str, Any] = {":first": {"S": first}, ":last": {"S": last}}
        where = "#day BETWEEN :first AND :last"
        if model is not None:
            names["#model"] = "model"
            values[":model"] = {"S": model}
            where += " AND #model = :model"
        request: dict[str, Any] = {
            "TableName": self.name,
            "FilterExpression": where,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }
        operation = "scan"
        if caller is not None:
            operation = "query"
            request["KeyConditionExpression"] = "caller = :caller AND sk BETWEEN :from AND :to"
            # Every model of `last` sorts below `last#~` ('~' is above the name characters).
            values |= {":caller": {"S": caller}, ":from": {"S": first}, ":to": {"S": last + "#~"}}
        found: list[dict[str, Any]] = []
        while True:
            try:
                page = self._table.read(operation, **request)
            except (Contended, LimiterUnavailable):
                raise LimiterUnavailable(
                    "the usage table is unavailable or busy; retry later", retry_after=1
                ) from None
            found += [_row(item) for item in page.get("Items", [])]
            if len(found) > MAX_ROWS:
                raise InvalidRequest(
                    f"more than {MAX_ROWS} usage rows match; narrow the query with caller, "
                    "model, from or to"
                )
            if "LastEvaluatedKey" not in page:
                break
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return sorted(found, key=lambda row: (row["day"], row["caller"], row["model"]))


def _row(item: dict[str, Any]) -> dict[str, Any]:
    def count(name: str) -> int:
        return int(item.get(name, {}).get("N", "0"))

    return {
        "caller": item["caller"]["S"],
        "model": item["model"]["S"],
        "day": item["day"]["S"],
        "requests": count("requests"),
        "prompt_tokens": count("prompt_tokens"),
        "completion_tokens": count("completion_tokens"),
        "slot_seconds": round(count("slot_ms") / 1000, 3),
        "refused": count("refused"),
    }


def day_range(first: str | None, last: str | None, today: str) -> tuple[str, str]:
    """The query's days, checked: `to` defaults to today, `from` to DEFAULT_DAYS before it."""
    try:
        end = _date(last if last is not None else today)
        start = _date(first) if first is not None else end - dt.timedelta(days=DEFAULT_DAYS - 1)
    except ValueError:
        raise InvalidRequest("from and to must be dates, YYYY-MM-DD (UTC days)") from None
    if start > end:
        raise InvalidRequest(f"from ({start}) is after to ({end})")
    if (end - start).days >= MAX_DAYS:
        raise InvalidRequest(f"from and to may span at most {MAX_DAYS} days")
    return start.isoformat(), end.isoformat()


def _date(text: str) -> dt.date:
    if not DATE.fullmatch(text):
        raise ValueError(text)
    return dt.date.fromisoformat(text)


async def read_usage(
    service: HermesService,
    caller: str | None,
    model: str | None,
    first: str | None,
    last: str | None,
) -> list[dict[str, Any]]:
    """GET /v1/usage for the asking caller (CALLER): its own rows, or with `"admin": true`
    in its own entry of the callers section (not `*`'s), any caller's or every caller's."""
    import asyncio

    asking = CALLER.get()
    try:
        wanted = given_caller(caller) if caller is not None else None
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    if model is not None and not 1 <= len(model) <= 100:
        raise InvalidRequest("model must be a model name of 1 to 100 characters")
    entry = (service.settings.callers or {}).get(asking)
    if entry is None or not entry.admin:
        if wanted not in (None, asking):
            raise Forbidden(
                f"caller '{asking}' may read only its own usage; another caller's needs "
                '"admin": true in its entry of the models file\'s callers section'
            )
        wanted = asking
    first, last = day_range(first, last, day_of(time.time()))
    if service.usage is None:
        return []
    return await asyncio.to_thread(service.usage.rows, wanted, model, first, last)
