"""Fair cross-instance admission on DynamoDB. The only code that talks to the lease table.

A *pool* is an Ollama host. Its capacity is a set of counters (`memory`, `inflight_<model>`)
held in one small state item; every lease, waiting request and grant is an item of its own
(records.py), so no write grows with the number of leases or waiters.

- Admission is one TransactWriteItems: add the weights to the state item, conditional on every
  counter staying within its capacity (and on no waiter being short of those counters: nobody
  jumps the queue), and put the lease item, whose key starts with its expiry.
- A request that may wait takes a ticket from an atomic counter (DynamoDB's own arrival order)
  and a queue entry sorted by ticket, moved back by priority (aging: never starved).
- Release is the mirror transaction, conditional on nobody waiting. When somebody waits, the
  releaser hands its capacity to the head of the queue in the same transaction (deletes its
  lease, deletes the head's entry, writes the head's lease and a grant notice). Waiters poll
  their notice with reads (a process batches all of its tickets into one BatchGetItem).
- A crashed holder's lease stays until its expiry; the next grant pass (any releaser whose
  head does not fit, any waiter near the head, any newcomer that finds the pool full) deletes
  it, conditional on its key, i.e. never before it expires. No sweeper, no TTL.
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
