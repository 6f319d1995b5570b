"""SQS worker: runs queued jobs under the same limits as the HTTP path. Failed records are
reported one by one (ReportBatchItemFailures), so one bad message does not redo the batch.

The event source hands it one record per invocation (BatchSize 1 in template.yaml), so each
job starts with the worker's whole timeout, which covers the slowest model's. Should a batch
hold more, a later record that could no longer get its model's whole timeout is handed back
as a fresh message, without using up one of its delivery attempts (Jobs.process)."""

from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from hermes.errors import InvalidRequest
from hermes.jobs import get_jobs
from hermes.observability import logger

# A fully failed batch is reported like a partial one (every id listed) instead of raising:
# SQS retries the same records either way, and the logs stay free of a stack trace.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if not isinstance(event, dict) or not event.get("Records"):
        return InvalidRequest("the worker only reads SQS events with Records").body()
    # Outside the records: a models file the worker cannot serve (ConfigError naming the
    # field) fails the invocation once, loudly, instead of as one failure per record.
    jobs = get_jobs()
    first_id = event["Records"][0].get("messageId")

    def record_handler(record: SQSRecord) -> None:
        jobs.process(
            record.body,
            int(record.attributes.approximate_receive_count),
            record.receipt_handle,
            context,
            first=record.message_id == first_id,
        )

    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
