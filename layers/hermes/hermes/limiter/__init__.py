"""Fair cross-instance admission on DynamoDB. The only code that talks to the lease table.

A *pool* is an Ollama host. Its capacity is a set of counters (`memory`, `inflight_<model>`)
held in one state item, beside the live leases grouped by expiry bucket (each bucket: the
weight its leases hold per counter and the set of their ids); every waiting request and
grant is an item of its own (records.py).

- Admission is one conditional UpdateItem of the state item: add the weights to the counters
  and to the lease's expiry bucket and its id to the bucket's set, conditional on every
  counter staying within its capacity, on no waiter being short of those counters (nobody
  jumps the queue) and on the id not being there yet (a retried write counts once). A
  single-item write holds nothing for a commit, so admissions do not cancel each other the
  way transactions on one item do (docs/design/conflicts.md).
- A request that may wait takes a ticket from an atomic counter (DynamoDB's own arrival order)
  and a queue entry sorted by ticket, moved back by priority (aging: never starved).
- Release is the mirror write, conditional on the id being there and nobody waiting. When
  somebody waits, the releaser hands its capacity to the head of the queue in one
  transaction (its id out, the head's in, the head's entry deleted, a grant notice written).
  Waiters poll their notice with reads (a process batches all of its tickets into one
  BatchGetItem).
- A crashed holder's lease stays until its bucket ends (at most one bucket, 1 s or 1/16 of
  the lease, after its expiry); the next grant pass (any releaser whose head does not fit,
  any waiter near the head, any newcomer that finds the pool full) reaps the whole bucket,
  conditional on it being as read. No sweeper, no TTL.
- Capacities come from the caller on every write: changed limits apply at once, no migration.

Why this is safe and what it costs: README, "How the limits hold".
"""

from hermes.limiter.limiter import ADMIT_PATIENCE_S, REAP_BATCH, RELEASE_RESERVE_S, Limiter
from hermes.limiter.records import (
    AGING_TICKETS,
    PRIORITIES,
    Counter,
    Lease,
    Ticket,
    lease_table_definition,
)
from hermes.limiter.table import Contended

__all__ = [
    "ADMIT_PATIENCE_S",
    "AGING_TICKETS",
    "PRIORITIES",
    "REAP_BATCH",
    "RELEASE_RESERVE_S",
    "Contended",
    "Counter",
    "Lease",
    "Limiter",
    "Ticket",
    "lease_table_definition",
]
