"""Supply chain: the layer's lock (layers/hermes/requirements.txt, `make lock`) pins and hashes
every package `sam build` installs for either architecture (with --no-deps: all of the layer's
dependencies but those the Lambda runtime provides, botocore among them), is current against
requirements.in and agrees with pyproject and the venv; `make audit` (part of `make lint`) fails
on a known vulnerability; setuptools is patched wherever it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import HeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from local.template import ROOT

pytestmark = pytest.mark.template
LAYER = ROOT / "layers" / "hermes"
LOCK = LAYER / "requirements.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS_FIXED = Version("78.1.1")  # CVE-2025-47273 (path traversal in PackageIndex)
# Lambda's python3.11 runtime ships boto3 and its dependencies: the lock leaves them out
RUNTIME_PROVIDED = {
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "python-dateutil",
    "six",
    "urllib3",
}
MAKE = ["make", "--no-print-directory", "-s"]


def requirements(text: str) -> list[str]:
    """The logical lines of a requirements file: continuations joined, comments dropped."""
    lines = [re.sub(r"(^|\s)#.*$", "", line).rstrip() for line in text.splitlines()]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` requirement."""
    found = {}
    for line in requirements(text):
        name, _, rest = line.partition("==")
        found[canonicalize_name(name)] = rest.split()[0]
    return found


LOCKED = pins(LOCK.read_text())


def test_the_lock_pins_and_hashes_every_requirement() -> None:
    lines = requirements(LOCK.read_text())
    assert len(lines) == len(LOCKED) >= 15  # the layer's packages, transitive ones included
    for line in lines:
        assert re.fullmatch(r"[a-z0-9._-]+==\S+( --hash=sha256:[0-9a-f]{64})+", line), line


def test_the_lock_hashes_cover_wheels_of_both_architectures() -> None:
    """pydantic-core and wrapt ship a wheel per platform: every file's hash is in the lock."""
    text = LOCK.read_text()
    for name in ("pydantic-core", "wrapt"):
        block = re.search(rf"(?ms)^{name}==.*?(?=^\S)", text)
        assert block and block.group().count("--hash=") > 20, name


@pytest.mark.parametrize("platform", ["manylinux2014_x86_64", "manylinux2014_aarch64"])
def test_pip_installs_exactly_the_lock_for_lambda(platform: str, tmp_path: Path) -> None:
    """The lock's wheels for Lambda's python3.11 on each architecture, as `sam build` fetches
    them (layers/hermes/Makefile): in hash mode pip refuses a requirement without a hash and
    a file whose hash is not listed, and --no-deps fetches nothing the lock does not name. So
    the lock must be whole: every dependency of every wheel is pinned in it, in the range the
    wheel asks for, or is the runtime's (the venv's version stands in for it)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
         "--only-binary=:all:", "--platform", platform, "--python-version", "3.11",
         "--implementation", "cp", "--abi", "cp311", "-d", str(tmp_path), "-r", str(LOCK)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    downloaded = {
        canonicalize_name(wheel.name.split("-")[0]): wheel.name.split("-")[1]
        for wheel in tmp_path.glob("*.whl")
    }
    assert downloaded == LOCKED
    arch = platform.split("_", 1)[1]
    assert any(arch in wheel.name for wheel in tmp_path.glob("pydantic_core-*.whl"))
    lambda_env = {**default_environment(), "platform_machine": arch, "sys_platform": "linux"}
    lambda_env |= {"platform_system": "Linux", "python_version": "3.11", "extra": ""}
    for wheel in tmp_path.glob("*.whl"):
        for needed in wheel_requirements(wheel):
            if needed.marker and not needed.marker.evaluate(lambda_env):
                continue
            name = canonicalize_name(needed.name)
            have = version(name) if name in RUNTIME_PROVIDED else LOCKED.get(name)
            assert have and have in needed.specifier, f"{wheel.name} needs {needed}"


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """A wheel's Requires-Dist, from its METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(metadata).decode())
    return [Requirement(r) for r in headers.get_all("Requires-Dist") or []]


@pytest.mark.parametrize("platform", ["x86_64-manylinux2014", "aarch64-manylinux2014"])
def test_the_lock_is_current(platform: str, tmp_path: Path) -> None:
    """`make lock` from requirements.in (keeping the lock's pins where they still fit) gives
    the same pins, for either architecture: nobody edited one without the other."""
    out = tmp_path / "requirements.txt"
    shutil.copy(LOCK, out)
    result = subprocess.run(
        [*MAKE, "lock", f"LOCK_OUT={out}", f"LOCK_PLATFORM={platform}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert pins(out.read_text()) == LOCKED


def test_the_lock_holds_the_project_pins_and_leaves_the_runtime_out() -> None:
    project = pins("\n".join(PYPROJECT["project"]["dependencies"]))
    direct = pins((LAYER / "requirements.in").read_text())
    assert direct == {name: v for name, v in project.items() if name not in RUNTIME_PROVIDED}
    assert {name: LOCKED.get(name) for name in direct} == direct
    # the runtime's packages are resolved (beside pyproject's boto3 pin) but left out: the
    # layer carries no botocore of its own, aws-xray-sdk takes the runtime's
    assert not RUNTIME_PROVIDED & LOCKED.keys()
    footer = LOCK.read_text().partition("were excluded from the output:")[2]
    excluded = {canonicalize_name(name) for name in re.findall(r"(?m)^# (\S+)$", footer)}
    assert excluded == RUNTIME_PROVIDED


def test_the_venv_has_the_versions_of_the_lock() -> None:
    """The Makefile installs the venv with the lock's pins as constraints: the tests run the
    very versions the layer ships."""
    assert {name: version(name) for name in LOCKED} == LOCKED


def test_setuptools_is_patched_wherever_it_is_installed_or_pinned() -> None:
    assert Version(version("setuptools")) >= SETUPTOOLS_FIXED
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    spec = next(r.specifier for r in build if r.name == "setuptools")
    assert SETUPTOOLS_FIXED in spec and "78.1.0" not in spec
    dev = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]]
    pinned = str(next(r.specifier for r in dev if r.name == "setuptools"))
    makefile = re.search(r"(?m)^SETUPTOOLS_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text())
    assert makefile and pinned == f"=={makefile.group(1)}"  # .tools/checkov's
    assert Version(makefile.group(1)) >= SETUPTOOLS_FIXED
    checkov = ROOT / ".tools" / "checkov" / "bin" / "python"  # made by `make install`
    if checkov.exists():
        result = subprocess.run(
            [checkov, "-c", "from importlib.metadata import version; print(version('setuptools'))"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert Version(result.stdout.strip()) >= SETUPTOOLS_FIXED


FAKE_VULN = "HERMES-TEST-0001"


@pytest.fixture
def osv_with_a_starlette_vulnerability() -> Iterator[str]:
    """An OSV API on loopback that knows one vulnerability: starlette, the lock's version."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            package = query["package"]["name"]
            vulns = []
            if package == "starlette" and query["version"] == LOCKED["starlette"]:
                vulns = [
                    {
                        "id": FAKE_VULN,
                        "summary": "a test vulnerability",
                        "affected": [
                            {
                                "package": {"name": "starlette", "ecosystem": "PyPI"},
                                "ranges": [
                                    {
                                        "type": "ECOSYSTEM",
                                        "events": [{"introduced": "0"}, {"fixed": "999.0"}],
                                    }
                                ],
                            }
                        ],
                    }
                ]
            body = json.dumps({"vulns": vulns} if vulns else {}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/query"
    finally:
        server.shutdown()
        server.server_close()


def make_audit(*overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAKE, "audit", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_make_audit_fails_on_a_known_vulnerability(osv_with_a_starlette_vulnerability: str) -> None:
    service = f"AUDIT_SERVICE=-s osv --osv-url {osv_with_a_starlette_vulnerability}"
    found = make_audit(service, "AUDIT_PROBE=")
    assert found.returncode != 0
    assert FAKE_VULN in found.stdout and "starlette" in found.stdout, found.stdout + found.stderr
    # an explicit --ignore-vuln lets it pass: the lock, then every package of the venv
    ignored = make_audit(service, "AUDIT_PROBE=", f"AUDIT_IGNORE=--ignore-vuln {FAKE_VULN}")
    assert ignored.returncode == 0, ignored.stdout + ignored.stderr
    assert "pip-audit: .venv" in ignored.stdout


def test_make_audit_says_when_it_could_audit_nothing(
    osv_with_a_starlette_vulnerability: str,
) -> None:
    probe = osv_with_a_starlette_vulnerability.replace("/v1/query", "/nothing")  # GET: 501
    skipped = make_audit(f"AUDIT_PROBE={probe}")
    assert skipped.returncode == 0 and "SKIPPED" in skipped.stdout
    assert make_audit(f"AUDIT_PROBE={probe}", "AUDIT_REQUIRED=1").returncode != 0


def test_make_lint_runs_the_audit() -> None:
    lint = re.search(r"(?ms)^lint:.*?(?=^\S)", (ROOT / "Makefile").read_text())
    assert lint and "audit" in lint.group()
