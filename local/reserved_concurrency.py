"""Print the LlmReservedConcurrency a models file needs, as a `sam deploy` parameter override:

    sam deploy --parameter-overrides "$(make -s concurrency) OllamaUrl=http://10.0.1.20:11434"

Every slot and every waiting place of every model holds a Lambda instance of whichever
generating function serves it (hermes.config.reserved_concurrency); the breakdown goes to
stderr. HERMES_MODELS_FILE chooses the file, as for the functions themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from local.runner import use_this_layer


def main() -> None:
    use_this_layer()
    from hermes.config import DEFAULT_MODELS_FILE, ConfigError, load_models, reserved_concurrency

    path = Path(os.environ.get("HERMES_MODELS_FILE") or DEFAULT_MODELS_FILE)
    try:
        models = load_models(path)
    except ConfigError as error:
        sys.exit(f"hermes: {error}")
    for name, model in sorted(models.items()):
        one = reserved_concurrency({name: model})
        print(
            f"{name}: {one} ({len(model.pool)} host(s) x ({model.max_concurrency} slots + "
            f"{model.waiting_limit} waiting))",
            file=sys.stderr,
        )
    print(f"LlmReservedConcurrency={reserved_concurrency(models)}")


if __name__ == "__main__":
    main()
