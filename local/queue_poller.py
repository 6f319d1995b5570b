"""What Lambda's SQS event source mapping does, for the local runner: poll a queue, hand
batches to the function's handler as SQS events, up to `max_concurrency` batches at once
(ScalingConfig.MaximumConcurrency: each would be an instance of its own), delete what
succeeded and leave the records it reports as failed (ReportBatchItemFailures) for
redelivery."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("hermes.local.queue")
POLL_INTERVAL_S = 0.2


class LocalLambdaContext:
    """The parts of Lambda's context object Hermes and powertools read."""

    def __init__(self, function_name: str, timeout_s: int) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = 256
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = (
            f"arn:aws:lambda:us-east-1:000000000000:function:{function_name}"
        )
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class QueuePoller(threading.Thread):
    def __init__(
        self,
        handler: Callable[[dict[str, Any], Any], Any],
        function_name: str,
        timeout_s: int,
        queue_url: str,
        batch_size: int,
        max_concurrency: int = 1,
    ) -> None:
        super().__init__(name=f"sqs-poller-{function_name}", daemon=True)
        self.handler = handler
        self.function_name = function_name
        self.timeout_s = timeout_s
        self.queue_url = queue_url
        self.batch_size = min(batch_size, 10)  # ReceiveMessage returns at most 10
        self.stopping = threading.Event()
        # A batch is received only when an "instance" is free to run it, as Lambda's poller
        # scales to MaximumConcurrency: messages never wait inside the runner unseen.
        self._free = threading.BoundedSemaphore(max_concurrency)
        self._instances = ThreadPoolExecutor(
            max_concurrency, thread_name_prefix=f"sqs-{function_name}"
        )

    def run(self) -> None:
        import boto3

        sqs = boto3.client("sqs")
        arn = sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        while not self.stopping.is_set():
            if not self._free.acquire(timeout=POLL_INTERVAL_S):
                continue
            try:
                messages = sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=self.batch_size,
                    # Short polls: the embedded moto server is single-threaded, and a long
                    # poll would hold every other AWS call of the runner behind it.
                    WaitTimeSeconds=0,
                    AttributeNames=["All"],
                ).get("Messages", [])
            except Exception as exc:
                self._free.release()
                log.warning("polling %s failed: %s", self.queue_url, exc)
                time.sleep(1)
                continue
            if messages:
                self._instances.submit(self._run, sqs, arn, messages)
            else:
                self._free.release()
                self.stopping.wait(POLL_INTERVAL_S)

    def _run(self, sqs: Any, arn: str, messages: list[dict[str, Any]]) -> None:
        try:
            self._deliver(sqs, arn, messages)
        except Exception:  # the batch's messages come back after their visibility timeout
            log.exception("delivering a batch of %s failed", self.function_name)
        finally:
            self._free.release()

    def _deliver(self, sqs: Any, arn: str, messages: list[dict[str, Any]]) -> None:
        event = {"Records": [_record(message, arn) for message in messages]}
        context = LocalLambdaContext(self.function_name, self.timeout_s)
        try:
            response = self.handler(event, context) or {}
            failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
        except Exception:
            log.exception("%s raised: the whole batch will be redelivered", self.function_name)
            return
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)
                ],
            )


def _record(message: dict[str, Any], arn: str) -> dict[str, Any]:
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": {},
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": arn.split(":")[3],
    }
