"""Non-HTTP events (direct invokes, SQS batches) the way the Docker-free runner calls a
handler: its own environment setup, its own handler loading, its Lambda context.

    python -m tests.sam_local.runner_invoke FUNCTION EVENT.json [FUNCTION EVENT.json ...]

prints one `ANSWER <json>` line per event. The runner only serves HTTP; for SQS it calls
the worker's handler exactly like this from its queue poller (local/queue_poller.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(args: list[str]) -> None:
    from local.queue_poller import LocalLambdaContext
    from local.runner import apply_function_environment, ensure_queues, load_handler
    from local.template import ROOT, functions, load_template

    sys.path.insert(0, str(ROOT / "layers" / "hermes"))
    template = load_template()
    fns = functions(template)
    apply_function_environment(template, fns, ensure_queues(template))
    for name, event in zip(args[::2], args[1::2], strict=True):
        handler = load_handler(fns[name])
        answer = handler(json.loads(Path(event).read_text()), LocalLambdaContext(name, 60))
        print("ANSWER", json.dumps(answer), flush=True)  # the handlers log JSON lines too


if __name__ == "__main__":
    main(sys.argv[1:])
