"""The Lambda image SAM runs the functions in: AWS's own when it can be had, else a stand-in.

SAM 1.170 runs a python3.11 function on `public.ecr.aws/lambda/python:3.11-x86_64`
(asked for even with --skip-pull-image), adds its bundled aws-lambda-rie and a layer of
its own on top, needs /bin/sh in the image, and starts /var/runtime/bootstrap with the
handler in _HANDLER / AWS_LAMBDA_FUNCTION_HANDLER.

Where that registry cannot be reached (our machines reach PyPI, Debian and npm only), the
stand-in is made of the same parts without pulling anything: Debian 12 minbase from
debootstrap (it ships Python 3.11), AWS's runtime interface client `awslambdaric` from
PyPI in /var/runtime, boto3 where the real runtime keeps it, a bootstrap that gives
Lambda's import order, and the real image's entrypoint and environment. It gets its own
name and SAM gets it through --invoke-image, so it is never mistaken for AWS's image and
never shadows it: the day the registry answers, the real image is used.

The root filesystem is built once (about 1 minute, mostly debootstrap) and cached as a
tarball under .cache/sam/; importing it into an engine takes a few seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from local.sam.docker_engine import Engine, apt_install
from local.template import ROOT

REAL_IMAGE = "public.ecr.aws/lambda/python:3.11-x86_64"
STANDIN_REPO = "hermes/lambda-python-standin"
STANDIN_LABEL = "org.hermes.lambda-standin"
CACHE_DIR = ROOT / ".cache" / "sam"
DEBIAN_SUITE = "bookworm"  # Debian 12: Python 3.11, the functions' runtime
DEBIAN_MIRROR = os.environ.get("HERMES_DEBIAN_MIRROR", "http://deb.debian.org/debian")
AWSLAMBDARIC = "awslambdaric==4.2.2"

# Lambda's python3.11 import order: function code, layers, the runtime client, then the
# packages the runtime ships (boto3). Layers before the runtime's boto3, as on Lambda: a
# layer's package shadows the runtime's (Hermes' layer ships no botocore of its own).
BOOTSTRAP = """#!/bin/sh
# Stand-in for the python3.11 Lambda runtime's bootstrap (see local/sam/lambda_image.py).
export AWS_EXECUTION_ENV=AWS_Lambda_python3.11
export PYTHONPATH="/var/task:/opt/python/lib/python3.11/site-packages:/opt/python:\
/var/runtime:/var/lang/lib/python3.11/site-packages"
cd "${LAMBDA_TASK_ROOT:-/var/task}"
exec /var/lang/bin/python3.11 -m awslambdaric "${_HANDLER:-$AWS_LAMBDA_FUNCTION_HANDLER}"
"""

# As in AWS's base images: `docker run image handler` works too, not only SAM's way.
ENTRYPOINT = """#!/bin/sh
if [ $# -ne 1 ]; then
  echo "entrypoint requires the handler name to be the first argument" 1>&2
  exit 142
fi
export _HANDLER="$1"
RUNTIME_ENTRYPOINT=/var/runtime/bootstrap
if [ -z "${AWS_LAMBDA_RUNTIME_API}" ]; then
  exec /usr/local/bin/aws-lambda-rie $RUNTIME_ENTRYPOINT
else
  exec $RUNTIME_ENTRYPOINT
fi
"""

# The real image's environment (LANG: Debian minbase has no en_US locale, C.UTF-8 is UTF-8
# all the same).
IMAGE_CONFIG = [
    "ENV PATH=/var/lang/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "ENV TZ=:/etc/localtime",
    "ENV LD_LIBRARY_PATH=/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:"
    "/var/task:/var/task/lib:/opt/lib",
    "ENV LAMBDA_TASK_ROOT=/var/task",
    "ENV LAMBDA_RUNTIME_DIR=/var/runtime",
    "WORKDIR /var/task",
    'ENTRYPOINT ["/lambda-entrypoint.sh"]',
]

PIP_FLAGS = ("--quiet", "--disable-pip-version-check", "--only-binary=:all:",
             "--implementation", "cp", "--python-version", "3.11",
             "--platform", "manylinux2014_x86_64")  # fmt: skip

# Not needed to run a function: documentation, translations, apt's package lists.
TRIM = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
        "var/cache/apt", "var/lib/apt/lists"]  # fmt: skip


def boto3_pin() -> str:
    """The boto3 the project is tested with stands in for the one the runtime ships."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return next(d for d in pyproject["project"]["dependencies"] if d.startswith("boto3=="))


def recipe_version() -> str:
    """Changes whenever what goes into the stand-in changes, so a stale cache is rebuilt."""
    recipe = "\n".join(
        [
            DEBIAN_SUITE,
            AWSLAMBDARIC,
            boto3_pin(),
            BOOTSTRAP,
            ENTRYPOINT,
            *IMAGE_CONFIG,
            *TRIM,
            *PIP_FLAGS,
        ]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def standin_image() -> str:
    return f"{STANDIN_REPO}:3.11-x86_64-{recipe_version()}"


def tarball() -> Path:
    return CACHE_DIR / f"lambda-python3.11-x86_64-{recipe_version()}.tar"


def invoke_image(engine: Engine) -> str | None:
    """None when AWS's image is there or can be pulled (SAM uses it by itself); else the
    stand-in's name, for --invoke-image, imported into the engine first."""
    if _has_image(engine, REAL_IMAGE):
        return None
    started = time.monotonic()
    print(f"pulling {REAL_IMAGE}...", flush=True)
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        engine.docker("pull", "--quiet", REAL_IMAGE, timeout=600)
        print(f"  pulled in {time.monotonic() - started:.0f} s", flush=True)
        return None
    image = standin_image()
    if _has_image(engine, image):
        print(f"  not reachable: using the stand-in {image}", flush=True)
        return image
    path = ensure_tarball()
    print(f"  not reachable: importing the stand-in {image} from {path.name}", flush=True)
    started = time.monotonic()
    changes = [arg for line in [*IMAGE_CONFIG, f"LABEL {STANDIN_LABEL}={recipe_version()}"]
               for arg in ("--change", line)]  # fmt: skip
    engine.docker("import", *changes, str(path), image, timeout=600)
    print(f"  imported in {time.monotonic() - started:.1f} s", flush=True)
    return image


def _has_image(engine: Engine, name: str) -> bool:
    return bool(engine.docker("image", "ls", "--quiet", name, check=False))


def ensure_tarball() -> Path:
    """The cached root filesystem, built under a lock so concurrent sessions build it once."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = tarball()
    with open(CACHE_DIR / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            build_tarball(path)
            for stale in CACHE_DIR.glob("lambda-python3.11-x86_64-*.tar"):
                if stale != path:  # an older recipe's
                    stale.unlink()
    return path


def build_tarball(path: Path) -> None:
    if os.geteuid() != 0:
        raise RuntimeError("building the Lambda stand-in image needs root (debootstrap, chroot)")
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    started = time.monotonic()
    print(
        f"building the Lambda stand-in image (Debian {DEBIAN_SUITE} minbase + python3.11 + "
        f"{AWSLAMBDARIC}); about 1 minute, once",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="standin-", dir=CACHE_DIR))
    rootfs = work / "rootfs"
    try:
        _debootstrap(rootfs)
        for trimmed in TRIM:
            for child in (rootfs / trimmed).glob("*"):
                _remove(child)
        _pip_install(rootfs / "var/runtime", AWSLAMBDARIC)
        _pip_install(rootfs / "var/lang/lib/python3.11/site-packages", boto3_pin())
        (rootfs / "var/task").mkdir(parents=True, exist_ok=True)
        (rootfs / "opt").mkdir(exist_ok=True)
        lang_bin = rootfs / "var/lang/bin"
        lang_bin.mkdir(parents=True, exist_ok=True)
        for name in ("python3.11", "python3", "python"):
            (lang_bin / name).symlink_to("/usr/bin/python3.11")
        for relative, text in (("var/runtime/bootstrap", BOOTSTRAP),
                               ("lambda-entrypoint.sh", ENTRYPOINT)):  # fmt: skip
            (rootfs / relative).write_text(text)
            (rootfs / relative).chmod(0o755)
        partial = path.with_suffix(".partial")
        subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], check=True
        )
        partial.rename(path)  # only a complete tarball ever has the final name
    finally:
        _unmount_under(rootfs)
        shutil.rmtree(work, ignore_errors=True)
    size = path.stat().st_size / 1e6
    print(
        f"  stand-in built in {time.monotonic() - started:.0f} s ({size:.0f} MB, {path})",
        flush=True,
    )


# debootstrap's "I: <Verb> <package>..." lines, by phase.
PHASES = {
    "Retrieving": "downloading",
    "Validating": "downloading",
    "Extracting": "extracting",
    "Unpacking": "installing",
    "Configuring": "configuring",
}


def _debootstrap(rootfs: Path) -> None:
    """debootstrap, its output condensed: a line when a phase starts and every 25 packages
    (a silent minute would look like a hang); the last lines in full when it fails."""
    command = ["debootstrap", "--variant=minbase", "--include=python3,ca-certificates",
               DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    tail: list[str] = []
    phase, packages = "", 0
    for line in process.stdout:
        tail = [*tail, line][-30:]
        match = re.match(r"I: (\w+) (\S+)", line)
        if not match or match[1] not in PHASES or match[1] == "Validating":
            continue
        if PHASES[match[1]] != phase:
            phase, packages = PHASES[match[1]], 0
            print(f"  debootstrap: {phase} ({time.monotonic() - started:.0f} s)", flush=True)
        packages += 1
        if packages % 25 == 0:
            elapsed = time.monotonic() - started
            print(f"  debootstrap: {phase}, {packages} done ({elapsed:.0f} s)", flush=True)
    if process.wait() != 0:
        sys.stdout.writelines(tail)
        raise RuntimeError(f"debootstrap failed: {' '.join(command)}")


def _pip_install(target: Path, requirement: str) -> None:
    """Wheels for Lambda's platform (manylinux x86_64, CPython 3.11), never built here,
    compiled to .pyc as the runtime's own packages are (a cold start then only reads them)."""
    print(f"  pip: {requirement}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", *PIP_FLAGS, "--target", str(target), requirement],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pip install {requirement} failed:\n{result.stdout}{result.stderr}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _unmount_under(root: Path) -> None:
    """debootstrap mounts /proc and /sys in the target; never delete through a mount."""
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(root))
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
