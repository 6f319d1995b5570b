"""`sam build`, then `sam local start-api` / `sam local invoke`, wired to local services.

Why each flag is passed explicitly:
- samconfig.toml's [default.local_start_api] (warm_containers...) is read next to the
  template, and -t points into the build dir: it would be ignored.
- sam local passes a function only the variables the template declares, and a declared
  variable takes the shell's value before the template's: the endpoints therefore go in as
  template parameters (LocalDynamoDbEndpoint, LocalSqsEndpoint, OllamaUrl), queue URLs in
  an --env-vars file, and sam runs with the declared names removed from its environment.
- Fake credentials only: a local run must never reach a real AWS account.
- --skip-pull-image: the image is already there (lambda_image.py made sure of it).
- --add-host host.docker.internal: it does not resolve on Linux by itself.

The build goes to .aws-sam/local/, never to the .aws-sam/build that `sam deploy` packages:
a local run may put its own models file (the embedded model's) into the built layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from local.process import die_with_parent
from local.sam.docker_engine import Engine
from local.sam.wiring import Wiring
from local.template import ROOT, functions

SAM = str(Path(sys.executable).parent / "sam")
BUILD_ROOT = ROOT / ".aws-sam" / "local"
BUILD_DIR = BUILD_ROOT / "build"
TEMPLATE = BUILD_DIR / "template.yaml"
CONTAINER_ID = re.compile(r"SAM_CONTAINER_ID: ([0-9a-f]{12,64})")


def build(
    models_file: str | None = None, output: IO[str] | None = None, build_dir: Path = BUILD_DIR
) -> Path:
    """`sam build` (cached, x86_64: the architecture of the image and of our machines) into
    `build_dir`; the layer gets `models_file` (default: HERMES_MODELS_FILE or the
    repository's models.json). Returns the built template. A test session builds into a
    directory of its own: a build rewritten under a running start-api makes sam restart its
    containers. The cache is shared: it is keyed by content."""
    command = [
        SAM, "build",
        "--build-dir", str(build_dir),
        "--cache-dir", str(BUILD_ROOT / "cache"),
        "--cached", "--parallel",
        "--parameter-overrides", "Architecture=x86_64",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
        stdout=output or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"sam build failed:\n{result.stdout or ''}")
    from hermes.config import DEFAULT_MODELS_FILE

    source = models_file or os.environ.get("HERMES_MODELS_FILE") or str(DEFAULT_MODELS_FILE)
    shutil.copyfile(source, build_dir / "HermesLayer" / "python" / "hermes" / "models.json")
    return build_dir / "template.yaml"


def sam_env(engine: Engine, wiring: Wiring) -> dict[str, str]:
    """sam's own environment: the engine, fake credentials, none of the declared variables.
    sam asks STS who the caller is before every invoke (for AWS::AccountId); moto answers
    at once, where AWS's endpoint would cost seconds and a request to AWS."""
    declared = {name for fn in functions().values() for name in fn.environment}
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in declared and not name.startswith(("AWS_", "DOCKER_"))
    }
    return {
        **env,
        **engine.env(),
        "SAM_CLI_TELEMETRY": "0",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_STS": wiring.host_sqs,
    }


def write_env_vars(wiring: Wiring) -> Path:
    fd, name = tempfile.mkstemp(prefix="sam-env-vars-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(wiring.env_vars(), out)
    return Path(name)


def local_args(
    engine: Engine,
    wiring: Wiring,
    image: str | None,
    env_vars: Path,
    parameters: dict[str, str] | None = None,
    template: Path = TEMPLATE,
) -> list[str]:
    """The flags `sam local start-api` and `sam local invoke` share."""
    overrides = {**wiring.parameters(), **(parameters or {})}
    args = [
        "-t", str(template),
        "--parameter-overrides", *(f"{name}={value}" for name, value in overrides.items()),
        "--env-vars", str(env_vars),
        "--skip-pull-image",
        "--add-host", f"host.docker.internal:{engine.gateway()}",
    ]  # fmt: skip
    if image:
        args += ["--invoke-image", image]
    return args


class StartApi:
    """`sam local start-api` in its own session (a Ctrl-C meant for the terminal reaches
    us, and we stop sam with SIGTERM: sam ignores SIGINT when started from a script, and
    on SIGTERM it removes its containers)."""

    def __init__(
        self,
        engine: Engine,
        wiring: Wiring,
        image: str | None,
        port: int = 3000,
        parameters: dict[str, str] | None = None,
        warm: str = "EAGER",
        output: IO[str] | None = None,
        template: Path = TEMPLATE,
    ) -> None:
        self.engine = engine
        self.wiring = wiring
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env_vars = write_env_vars(wiring)
        self.command = [
            SAM, "local", "start-api",
            *local_args(engine, wiring, image, self.env_vars, parameters, template),
            "--host", "127.0.0.1", "--port", str(port),
            "--warm-containers", warm,
        ]  # fmt: skip
        # sam's log is read back for the ids of the containers it made (SAM_CONTAINER_ID).
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sam-api-", suffix=".log")  # noqa: SIM115
        self.output = output
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout_s: float = 300) -> StartApi:
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=sam_env(self.engine, self.wiring),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # Should we be killed outright, sam still gets its SIGTERM and removes its containers.
            preexec_fn=die_with_parent,
        )
        import threading

        threading.Thread(target=self._copy_output, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sam local start-api exited:\n{self.read_log()[-4000:]}")
            # sam listens only once the warm containers are up.
            if "Running on http" in self.read_log():
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                        return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"sam local start-api did not listen within {timeout_s:.0f} s")

    def _copy_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log.write(line)
            self.log.flush()
            if self.output is not None:
                self.output.write(line)
                self.output.flush()

    def read_log(self) -> str:
        with open(self.log.name) as log:
            return log.read()

    def container_ids(self) -> set[str]:
        return set(CONTAINER_ID.findall(self.read_log()))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        remove_containers(self.engine, self.container_ids())
        self.env_vars.unlink(missing_ok=True)


def remove_containers(engine: Engine, ids: set[str]) -> None:
    """The containers sam made and left (only when it was killed): by their own ids."""
    if not ids:
        return
    present = set(engine.docker("ps", "-aq", "--no-trunc", check=False).split())
    left = [cid for cid in ids if any(full.startswith(cid) for full in present)]
    if left:
        engine.docker("rm", "-f", *left, check=False)


def invoke(
    engine: Engine,
    wiring: Wiring,
    image: str | None,
    function: str,
    event: Path,
    parameters: dict[str, str] | None = None,
    timeout_s: float = 600,
    template: Path = TEMPLATE,
) -> tuple[Any, str]:
    """`sam local invoke FUNCTION -e EVENT`: (the function's answer, sam's log).

    Retried once when the function timed out: sam counts a container's cold start (the
    layer's imports) into the function's timeout, which Lambda does not (init has its own
    10 s), and a cold start on a busy 2-core machine can pass a 10 s timeout on its own."""
    try:
        return _invoke(engine, wiring, image, function, event, parameters, timeout_s, template)
    except FunctionTimedOut:
        return _invoke(engine, wiring, image, function, event, parameters, timeout_s, template)


class FunctionTimedOut(RuntimeError):
    pass


def _invoke(
    engine: Engine,
    wiring: Wiring,
    image: str | None,
    function: str,
    event: Path,
    parameters: dict[str, str] | None,
    timeout_s: float,
    template: Path,
) -> tuple[Any, str]:
    env_vars = write_env_vars(wiring)
    process = subprocess.Popen(
        [SAM, "local", "invoke", function, "-e", str(event),
         *local_args(engine, wiring, image, env_vars, parameters, template)],
        cwd=ROOT,
        env=sam_env(engine, wiring),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()  # sam's container outlives it: removed below by the id sam logged
        stdout, stderr = process.communicate()
        stderr += f"\nsam local invoke {function} killed after {timeout_s:.0f} s"
    finally:
        env_vars.unlink(missing_ok=True)
    # Normally gone already: sam removes its container after the invoke.
    remove_containers(engine, set(CONTAINER_ID.findall(stderr)))
    # The answer is sam's stdout, the function's own logs are on stderr.
    if f"Function '{function}' timed out" in stderr:
        raise FunctionTimedOut(f"sam local invoke {function}: the function timed out")
    if process.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"sam local invoke {function} failed:\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), stderr
