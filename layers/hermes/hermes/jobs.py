"""Async jobs, for generations that cannot finish behind API Gateway's 30 s limit.

submit: validate → job record `queued` in the jobs table → SQS message {"job_id"}.
worker: SQS message → `running` → the same service.generate (same limits, budget and
timeouts) at most once per job (powertools idempotency) → `succeeded` with the result.
A busy model is not a failure: the job is re-queued as a new, delayed message (growing,
jittered delays), so waiting never uses up the queue's delivery attempts; it stays
`queued` up to HERMES_JOB_MAX_WAIT_S. An unavailable backend or an error is retried
through a growing visibility timeout; on the queue's last delivery the job reads
`failed` and SQS moves the message to the dead-letter queue. A job that waited past
HERMES_JOB_MAX_WAIT_S reads `failed` too, and the worker moves its message to the dead-letter
queue itself (its fresh messages never reach the queue's receive count). Bad input fails at
once.

Every job gets its model's whole timeout: the worker takes one record per invocation
(BatchSize 1), and a record that would still start with less time left than its model needs
(a larger batch, a slow start) is handed back as a fresh message without using an attempt.

Requests and results are stored zlib-compressed (Binary) so a prompt /v1/llm accepts fits
DynamoDB's 400 KB item; a result that does not fit fails the job with `result_too_large`.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
import uuid
from functools import lru_cache
from typing import Any

from hermes.aio import run_sync
from hermes.aws import client
from hermes.callers import ANONYMOUS, CALLER, acting_as
from hermes.config import Settings, check_worker_timeout, job_time_needed_s
from hermes.errors import (
    CallerBusy,
    HermesError,
    HostBusy,
    InternalError,
    JobNotFound,
    ModelBusy,
    PromptTooLarge,
    QueueFull,
    QueueUnavailable,
    QuotaExceeded,
    RequestInProgress,
    ResultTooLarge,
    is_retryable,
)
from hermes.http import lambda_time_left_s
from hermes.idempotency import MAX_RESULT_BYTES, once, pack, packed, unpack
from hermes.schemas import Priority, parse_generate_request
from hermes.service import HermesService, get_service

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed")
# DynamoDB items hold at most 400 KB (409,600 bytes, attribute names included). A job record
# holds its compressed request until it succeeds, then its compressed result instead.
MAX_REQUEST_BYTES = 350_000
# The result also travels through the idempotency record as base64 (4/3 of it: 373 KB).
MAX_RETRY_DELAY_S = 900  # SQS caps a visibility timeout change at 12 h; 15 min is plenty
MAX_DELAY_S = 900  # SQS's limit for DelaySeconds


class RetryLater(Exception):
    """Tells the batch processor to leave this message on the queue for another attempt."""


class Jobs:
    def __init__(self, service: HermesService, dynamodb: Any, sqs: Any) -> None:
        self.service = service
        self.settings: Settings = service.settings
        self._ddb = dynamodb
        self._sqs = sqs
        check_worker_timeout(self.settings)  # a model the worker cannot serve fails at load

    # -- API side ---------------------------------------------------------------

    def submit(self, model: str, body: Any, *, priority: Priority | None = None) -> dict[str, Any]:
        """Queue `body` for `model`. `priority` (the X-Hermes-Priority header) is kept in the
        stored request unless the body has its own, so the worker's run is admitted with it."""
        config = self.service.model(model)
        # The prompt is counted in characters, as /v1/llm counts it; what is stored is the
        # compressed request, which only a pathological (random) request fails to fit.
        parsed = parse_generate_request(body, self.settings.max_prompt_chars, config)
        if parsed.priority is None and priority is not None:
            body = {**body, "priority": priority}
        effective: Priority = parsed.priority or priority or "normal"
        request = pack(body)
        if len(request) > MAX_REQUEST_BYTES:
            raise PromptTooLarge(
                f"the job request takes {len(request)} bytes compressed; a job record holds at "
                f"most {MAX_REQUEST_BYTES}"
            )
        if not self.settings.jobs_queue_url:
            raise QueueUnavailable("no jobs queue is configured (HERMES_JOBS_QUEUE_URL)")
        job_id = uuid.uuid4().hex
        now = time.time()
        self._call(
            "put_item",
            TableName=self.settings.jobs_table,
            Item={
                "job_id": {"S": job_id},
                "model": {"S": model},
                "status": {"S": "queued"},
                "priority": {"S": effective},
                # The submitter: the worker runs the job as this caller, under its limits.
                "caller": {"S": CALLER.get()},
                "request_z": {"B": request},
                "attempts": {"N": "0"},
                "created_at": {"N": f"{now:.3f}"},
                "updated_at": {"N": f"{now:.3f}"},
                # TTL is only cleanup: finished jobs disappear some time after retention.
                "expires_at": {"N": str(int(now) + self.settings.job_retention_s)},
            },
            ConditionExpression="attribute_not_exists(job_id)",
        )
        try:
            self._send(job_id)
        except Exception as exc:
            log.error("could not enqueue job %s: %s", job_id, exc)
            self._finish(
                job_id, "failed", error="the jobs queue is unavailable", code="queue_unavailable"
            )
            raise QueueUnavailable(
                "the jobs queue is unavailable; retry later", retry_after=5
            ) from None
        return {
            "job_id": job_id,
            "status": "queued",
            "model": model,
            "priority": effective,
            "status_url": f"/v1/jobs/{job_id}",
        }

    def get(self, job_id: str) -> dict[str, Any]:
        """The job, to its submitter only: another caller is told it does not exist (404, as
        for an unknown id, so job ids of others cannot be probed)."""
        item = self._load(job_id)
        submitter = item["caller"]["S"] if item is not None and "caller" in item else ANONYMOUS
        if item is None or submitter != CALLER.get():
            raise JobNotFound(
                f"no job '{job_id[:64]}' (jobs are kept {self.settings.job_retention_s} s)"
            )
        view: dict[str, Any] = {
            "job_id": job_id,
            "model": item["model"]["S"],
            "status": item["status"]["S"],
            # Its place among requests waiting for the model (records before it: normal).
            "priority": item["priority"]["S"] if "priority" in item else "normal",
            "caller": item["caller"]["S"] if "caller" in item else ANONYMOUS,
            # Deliveries of the current message, and how often the job waited for capacity.
            "attempts": int(item["attempts"]["N"]),
            "waits": int(item["waits"]["N"]) if "waits" in item else 0,
            "created_at": float(item["created_at"]["N"]),
            "updated_at": float(item["updated_at"]["N"]),
        }
        if "result_z" in item:
            view["result"] = unpack(item["result_z"]["B"])
        elif "result" in item:  # a record written before results were compressed
            view["result"] = json.loads(item["result"]["S"])
        for field in ("error", "code"):
            if field in item:
                view[field] = item[field]["S"]
        return view

    # -- worker side --------------------------------------------------------------

    def process(
        self,
        body: str,
        receive_count: int,
        receipt_handle: str,
        context: Any,
        *,
        first: bool = True,
    ) -> None:
        """Handle one SQS message; raising RetryLater leaves it on the queue. `first`: no
        earlier record of this invocation's batch has run (it is never handed back)."""
        try:
            message = json.loads(body)
            job_id, waits = message["job_id"], int(message.get("waits", 0))
            assert isinstance(job_id, str)
        except (ValueError, KeyError, TypeError, AssertionError):
            # Nothing to mark: let it go round until SQS parks it in the dead-letter queue.
            raise RetryLater(f"malformed job message: {body[:200]!r}") from None
        item = self._load(job_id)
        if item is None:
            log.error("job %s has no record (expired or never written); dropping it", job_id)
            return
        if item["status"]["S"] in FINISHED:
            return  # a redelivery after the job finished
        model = item["model"]["S"]
        if not first and not self._time_for(model, context):
            # Started now, it would get less than its model's timeout. A fresh message is a
            # new first delivery (ApproximateReceiveCount 1), so no attempt is used up; the
            # next invocation starts with the worker's whole timeout. The first record of an
            # invocation is never handed back, so a job always makes progress.
            self._send(job_id, waits=waits)
            log.info("job %s handed back: not enough time left in this invocation", job_id)
            return
        self._update(job_id, status="running", attempts=receive_count)
        try:
            data = {"job_id": job_id, "model": model, "body": _request(item)}
            with acting_as(item["caller"]["S"] if "caller" in item else ANONYMOUS):
                result = once(lambda d: self._run(d, context), data, key="job_id", context=context)
        except (ModelBusy, HostBusy, QueueFull, CallerBusy, QuotaExceeded) as busy:
            waited = time.time() - float(item["created_at"]["N"])
            if waited < self.settings.job_max_wait_s:
                self._update(
                    job_id, status="queued", error=busy.message, code=busy.code, waits=waits + 1
                )
                self._send(job_id, waits=waits + 1, delay_s=self._backoff_s(waits + 1))
                return  # this delivery is done; the job lives on in the delayed message
            self._give_up(job_id, model, body, busy, waited)
            return
        except HermesError as error:
            self._after_failure(job_id, error, receive_count, receipt_handle)
            return
        except Exception as exc:  # a bug must not lose the job: retry, then dead-letter
            log.exception("job %s failed unexpectedly", job_id)
            self._after_failure(
                job_id, InternalError(str(exc)[:200]), receive_count, receipt_handle
            )
            return
        result_z = base64.b64decode(result["z"]) if "z" in result else pack(result)
        try:
            # The request is dropped on success: the result gets the record's whole room.
            self._finish(
                job_id,
                "succeeded",
                result_z=result_z,
                remove=("error", "code", "request", "request_z"),
            )
        except _TooLarge:  # MAX_RESULT_BYTES should have caught it; never leave it running
            self._finish(
                job_id, "failed", error=_too_large(len(result_z)), code=ResultTooLarge.code
            )

    def _run(self, data: dict[str, Any], context: Any) -> dict[str, Any]:
        deadline = lambda_time_left_s(context)
        result = run_sync(self.service.generate(data["model"], data["body"], deadline_s=deadline))
        # Checked here, inside the idempotent call, so that a result too large for the
        # records is a failure (nothing stored, the job failed at once), not a save error
        # that would call the model again on every redelivery.
        record, size = packed(result)
        if size > MAX_RESULT_BYTES:
            raise ResultTooLarge(_too_large(size))
        return record

    def _time_for(self, model: str, context: Any) -> bool:
        """Whether a job of `model` started now still gets its whole timeout."""
        model_config = self.settings.models.get(model)
        if not hasattr(context, "get_remaining_time_in_millis") or model_config is None:
            return True  # no Lambda deadline, or the run fails at once as not configured
        left_s = float(context.get_remaining_time_in_millis()) / 1000
        return left_s >= job_time_needed_s(model_config)

    def _give_up(
        self,
        job_id: str,
        model: str,
        body: str,
        busy: ModelBusy | HostBusy | QueueFull | CallerBusy | QuotaExceeded,
        waited: float,
    ) -> None:
        """The job waited past HERMES_JOB_MAX_WAIT_S: failed, and its message dead-lettered
        by the worker itself. Its current message is a fresh one (waiting re-queues), so SQS
        would never count it to maxReceiveCount; the dead-letter copy goes first, so a crash
        in between leaves the job to be given up again, never deleted unrecorded."""
        what = "memory budget on the host" if isinstance(busy, HostBusy) else "a free slot"
        message = (
            f"waited {waited:.0f} s for {what} of model '{model}' "
            f"(HERMES_JOB_MAX_WAIT_S={self.settings.job_max_wait_s}); giving up"
        )
        if self.settings.jobs_dlq_url:
            self._sqs.send_message(
                QueueUrl=self.settings.jobs_dlq_url,
                MessageBody=body,  # as the queue's own redrive would park it
                MessageAttributes={
                    "code": {"DataType": "String", "StringValue": busy.code},
                    "error": {"DataType": "String", "StringValue": message},
                },
            )
        else:
            log.warning("job %s gave up; no HERMES_JOBS_DLQ_URL to park it in", job_id)
        self._finish(job_id, "failed", error=message, code=busy.code)

    def _after_failure(self, job_id: str, error: HermesError, attempt: int, receipt: str) -> None:
        if isinstance(error, RequestInProgress):
            # A duplicate delivery while the first is running: come back for its result.
            self._delay(receipt, self._backoff_s(attempt))
            raise RetryLater(f"job {job_id} is running in another worker")
        if not is_retryable(error):
            self._finish(job_id, "failed", error=error.message, code=error.code)
            return
        if attempt >= self.settings.job_max_attempts:
            self._finish(job_id, "failed", error=error.message, code=error.code)
            self._delay(receipt, 0)  # visible again at once, so SQS dead-letters it now
            raise RetryLater(f"job {job_id} failed its last attempt: {error.code}")
        self._update(job_id, status="queued", error=error.message, code=error.code)
        self._delay(receipt, self._backoff_s(attempt))
        raise RetryLater(f"job {job_id} will be retried: {error.code}")

    def _send(self, job_id: str, waits: int = 0, delay_s: int = 0) -> None:
        body = {"job_id": job_id, "waits": waits} if waits else {"job_id": job_id}
        self._sqs.send_message(
            QueueUrl=self.settings.jobs_queue_url,
            MessageBody=json.dumps(body),
            DelaySeconds=min(delay_s, MAX_DELAY_S),
        )

    def _backoff_s(self, attempt: int) -> int:
        """Exponential backoff with jitter: base, 2x base, 4x base... capped."""
        base = self.settings.job_retry_base_s * 2 ** (attempt - 1)
        return min(MAX_RETRY_DELAY_S, int(base * random.uniform(0.5, 1.0)))

    def _delay(self, receipt: str, delay: int) -> None:
        """Next delivery in `delay` seconds, through the message's visibility timeout."""
        try:
            self._sqs.change_message_visibility(
                QueueUrl=self.settings.jobs_queue_url,
                ReceiptHandle=receipt,
                VisibilityTimeout=delay,
            )
        except Exception as exc:  # the queue's own visibility timeout still brings it back
            log.warning("could not delay the retry: %s", exc)

    # -- jobs table ---------------------------------------------------------------

    def _load(self, job_id: str) -> dict[str, Any] | None:
        if not job_id or len(job_id) > 64:
            return None
        response = self._call(
            "get_item",
            TableName=self.settings.jobs_table,
            Key={"job_id": {"S": job_id}},
            ConsistentRead=True,
        )
        item: dict[str, Any] | None = response.get("Item")
        return item

    def _update(self, job_id: str, *, remove: tuple[str, ...] = (), **fields: Any) -> None:
        fields["updated_at"] = time.time()
        names = {f"#f{i}": name for i, name in enumerate(fields)}
        values = {f":v{i}": _attr(value) for i, value in enumerate(fields.values())}
        sets = ", ".join(f"#f{i} = :v{i}" for i in range(len(fields)))
        names |= {f"#r{i}": name for i, name in enumerate(remove)}
        removes = ", ".join(f"#r{i}" for i in range(len(remove)))
        # A finished job never changes again, whatever a late or duplicate delivery does.
        names["#status"] = "status"
        values[":succeeded"], values[":failed"] = {"S": "succeeded"}, {"S": "failed"}
        try:
            self._call(
                "update_item",
                TableName=self.settings.jobs_table,
                Key={"job_id": {"S": job_id}},
                UpdateExpression=f"SET {sets}" + (f" REMOVE {removes}" if remove else ""),
                ConditionExpression="NOT #status IN (:succeeded, :failed)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except _AlreadyFinished:
            log.info("job %s had already finished; left as it is", job_id)

    def _finish(
        self, job_id: str, status: str, *, remove: tuple[str, ...] = (), **fields: Any
    ) -> None:
        fields["expires_at"] = int(time.time()) + self.settings.job_retention_s
        self._update(job_id, status=status, remove=remove, **fields)

    def _call(self, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._ddb, operation)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") == "ConditionalCheckFailedException":
                raise _AlreadyFinished() from None
            if error.get("Code") == "ValidationException" and "size" in error.get("Message", ""):
                raise _TooLarge() from None
            log.error("jobs table %s failed: %s", operation, exc)
            raise QueueUnavailable(
                "the jobs table is unavailable; retry later", retry_after=2
            ) from None
        except BotoCoreError as exc:
            log.error("jobs table %s failed: %s", operation, exc)
            raise QueueUnavailable(
                "the jobs table is unavailable; retry later", retry_after=2
            ) from None


class _AlreadyFinished(Exception):
    pass


class _TooLarge(Exception):
    """DynamoDB refused an item over 400 KB."""


def _attr(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"B": value}
    if isinstance(value, int | float):
        return {"N": str(value)}
    return {"S": str(value)}


def _request(item: dict[str, Any]) -> Any:
    if "request_z" in item:
        return unpack(item["request_z"]["B"])
    return json.loads(item["request"]["S"])  # a record written before requests were compressed


def _too_large(size: int) -> str:
    return (
        f"the result takes {size} bytes compressed; a job record holds at most "
        f"{MAX_RESULT_BYTES} (ask for fewer tokens with options.num_predict, or call the model "
        "directly)"
    )


@lru_cache(maxsize=1)
def get_jobs() -> Jobs:
    service = get_service()  # first: it starts tracing before any client is made
    return Jobs(service, client("dynamodb"), client("sqs"))
