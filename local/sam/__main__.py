"""`python -m local.sam api` (make sam-api) and `python -m local.sam invoke EVENT [FUNCTION]`
(make sam-invoke): SAM's emulator with everything it needs, stopped again on exit."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from local.sam import api, lambda_image
from local.sam.docker_engine import docker_engine
from local.sam.events import function_for
from local.sam.wiring import Services, forget_session, load_session, save_session
from local.template import http_routes


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # every `finally` below runs: sam, servers, engine stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.sam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("api", help="sam local start-api, wired")
    start.add_argument("--port", type=int, default=3000)
    start.add_argument("--warm-containers", default="EAGER", choices=["EAGER", "LAZY"])
    one = commands.add_parser("invoke", help="sam local invoke FUNCTION -e EVENT, wired")
    one.add_argument("event", type=Path)
    one.add_argument("function", nargs="?", help="default: the one the event is for")
    args = parser.parse_args(argv)
    # Set, not inherited: started in the background from a script (make ... &), SIGINT comes
    # ignored, and Python then never raises KeyboardInterrupt. A closed terminal stops us too.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    started = time.monotonic()
    try:
        with docker_engine() as engine:
            image = lambda_image.invoke_image(engine)
            with Services(engine.gateway()) as services:
                wiring = load_session() if args.command == "invoke" else None
                if wiring is not None:
                    # Its build too: rebuilding under a running start-api makes sam restart
                    # every warm container.
                    print("using the build, store and queues of the running `make sam-api`")
                else:
                    wiring = services.start()
                    print("\n".join(services.notes), flush=True)
                    print("sam build...", flush=True)
                    api.build(wiring.models_file)
                if args.command == "invoke":
                    function = args.function or function_for(json.loads(args.event.read_text()))
                    answer, log = api.invoke(engine, wiring, image, function, args.event)
                    sys.stderr.write(log)
                    print(json.dumps(answer, indent=2))
                    return 0
                return _serve(engine, wiring, image, args, started)
    except KeyboardInterrupt:
        return 130


def _serve(engine, wiring, image, args, started) -> int:  # type: ignore[no-untyped-def]
    server = api.StartApi(
        engine, wiring, image, port=args.port, warm=args.warm_containers, output=sys.stdout
    )
    save_session(wiring)
    try:
        server.start()
        routes = "\n".join(f"  {r.method:4} {server.url}{r.path}" for r in http_routes())
        example = f'curl -X POST {server.url}/v1/llm/gemma -d \'{{"prompt": "hi"}}\''
        print(
            f"\nHermes on SAM's emulator at {server.url} (ready in "
            f"{time.monotonic() - started:.0f} s; Ctrl-C stops it and everything it started)\n"
            f"{routes}\n  try: {example}\n",
            flush=True,
        )
        assert server.process is not None
        return server.process.wait()
    finally:
        print("stopping sam local start-api...", flush=True)
        server.stop()
        forget_session()


if __name__ == "__main__":
    sys.exit(main())
