"""Async jobs, for generations that cannot finish behind API Gateway's 30 s limit.

submit: validate → job record `queued` in the jobs table → SQS message {"job_id"}.
worker: SQS message → `running` → the same service.generate (same limits, budget and
timeouts) at most once per job (powertools idempotency) → `succeeded` with the result.
A busy model is not a failure: the job is re-queued as a new, delayed message (growing,
jittered delays), so waiting never uses up the queue's delivery attempts; it stays
`queued` up to HERMES_JOB_MAX_WAIT_S. An unavailable backend or an error is retried
through a growing visibility timeout; on the queue's last delivery the job reads
`failed` and SQS moves the message to the dead-letter queue. Bad input fails at once.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from functools import lru_cache
from typing import Any

from hermes.aio import run_sync
from hermes.aws import client
from hermes.config import Settings
from hermes.errors import (
    HermesError,
    HostBusy,
    InternalError,
    JobNotFound,
    ModelBusy,
    PromptTooLarge,
    QueueUnavailable,
    RequestInProgress,
    is_retryable,
)
from hermes.http import lambda_time_left_s
from hermes.idempotency import once
from hermes.schemas import parse_generate_request
from hermes.service import HermesService, get_service

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed")
# DynamoDB items hold at most 400 KB; leave room for the result next to the request.
MAX_REQUEST_BYTES = 200_000
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

    # -- API side ---------------------------------------------------------------

    def submit(self, model: str, body: Any) -> dict[str, Any]:
        self.service.model(model)
        parse_generate_request(body, self.settings.max_prompt_chars)
        request = json.dumps(body)
        if len(request.encode()) > MAX_REQUEST_BYTES:
            raise PromptTooLarge(f"a job request may hold at most {MAX_REQUEST_BYTES} bytes")
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
                "request": {"S": request},
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
            "status_url": f"/v1/jobs/{job_id}",
        }

    def get(self, job_id: str) -> dict[str, Any]:
        item = self._load(job_id)
        if item is None:
            raise JobNotFound(
                f"no job '{job_id[:64]}' (jobs are kept {self.settings.job_retention_s} s)"
            )
        view: dict[str, Any] = {
            "job_id": job_id,
            "model": item["model"]["S"],
            "status": item["status"]["S"],
            # Deliveries of the current message, and how often the job waited for capacity.
            "attempts": int(item["attempts"]["N"]),
            "waits": int(item["waits"]["N"]) if "waits" in item else 0,
            "created_at": float(item["created_at"]["N"]),
            "updated_at": float(item["updated_at"]["N"]),
        }
        if "result" in item:
            view["result"] = json.loads(item["result"]["S"])
        for field in ("error", "code"):
            if field in item:
                view[field] = item[field]["S"]
        return view

    # -- worker side --------------------------------------------------------------

    def process(self, body: str, receive_count: int, receipt_handle: str, context: Any) -> None:
        """Handle one SQS message; raising RetryLater leaves it on the queue."""
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
        self._update(job_id, status="running", attempts=receive_count)
        try:
            data = {
                "job_id": job_id,
                "model": item["model"]["S"],
                "body": json.loads(item["request"]["S"]),
            }
            result = once(lambda d: self._run(d, context), data, key="job_id", context=context)
        except (ModelBusy, HostBusy) as busy:
            if time.time() - float(item["created_at"]["N"]) < self.settings.job_max_wait_s:
                self._update(
                    job_id, status="queued", error=busy.message, code=busy.code, waits=waits + 1
                )
                self._send(job_id, waits=waits + 1, delay_s=self._backoff_s(waits + 1))
                return  # this delivery is done; the job lives on in the delayed message
            self._after_failure(job_id, busy, self.settings.job_max_attempts, receipt_handle)
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
        self._finish(job_id, "succeeded", result=result)

    def _run(self, data: dict[str, Any], context: Any) -> dict[str, Any]:
        deadline = lambda_time_left_s(context)
        return run_sync(self.service.generate(data["model"], data["body"], deadline_s=deadline))

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

    def _update(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        names = {f"#f{i}": name for i, name in enumerate(fields)}
        values = {f":v{i}": _attr(value) for i, value in enumerate(fields.values())}
        sets = ", ".join(f"#f{i} = :v{i}" for i in range(len(fields)))
        # A finished job never changes again, whatever a late or duplicate delivery does.
        names["#status"] = "status"
        values[":succeeded"], values[":failed"] = {"S": "succeeded"}, {"S": "failed"}
        try:
            self._call(
                "update_item",
                TableName=self.settings.jobs_table,
                Key={"job_id": {"S": job_id}},
                UpdateExpression=f"SET {sets}",
                ConditionExpression="NOT #status IN (:succeeded, :failed)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except _AlreadyFinished:
            log.info("job %s had already finished; left as it is", job_id)

    def _finish(
        self, job_id: str, status: str, *, result: dict[str, Any] | None = None, **fields: Any
    ) -> None:
        if result is not None:
            fields["result"] = json.dumps(result)
        fields["expires_at"] = int(time.time()) + self.settings.job_retention_s
        self._update(job_id, status=status, **fields)

    def _call(self, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._ddb, operation)(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise _AlreadyFinished() from None
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


def _attr(value: Any) -> dict[str, str]:
    if isinstance(value, int | float):
        return {"N": str(value)}
    return {"S": str(value)}


@lru_cache(maxsize=1)
def get_jobs() -> Jobs:
    service = get_service()  # first: it starts tracing before any client is made
    return Jobs(service, client("dynamodb"), client("sqs"))
