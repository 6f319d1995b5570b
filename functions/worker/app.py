"""SQS worker: runs queued jobs under the same limits as the HTTP path. Failed records are
reported one by one (ReportBatchItemFailures), so one bad message does not redo the batch."""

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

    def record_handler(record: SQSRecord) -> None:
        get_jobs().process(
            record.body,
            int(record.attributes.approximate_receive_count),
            record.receipt_handle,
            context,
        )

    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
