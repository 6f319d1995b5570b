"""`python -m bench.layer_cold_start`: what the Hermes layer's own botocore cost a cold start
(issue 22, item 4), the layer as `sam build` builds it now against the layer of the lock
before (BEFORE_REV), which shipped botocore, jmespath, python-dateutil, six and urllib3 for
aws-xray-sdk, shadowing the runtime's.

Both layers are built in the same run: now `sam build HermesLayer` (layers/hermes/Makefile),
before the old lock (`git show BEFORE_REV:layers/hermes/requirements.txt`) installed as SAM's
python3.11 build did, dependencies included (x86_64 wheels, no .pyc), with today's hermes
package in both. Each run is a fresh interpreter with Lambda's sys.path and nothing else
(`python -S`): the function, the layer, then the runtime's packages (boto3 and its
dependencies, copied from the venv as tests/template/test_build.py does). The runtime's are
compiled to .pyc beforehand, as Lambda's are; the function and the layer have none and
Lambda's /opt is read-only, so their modules compile at every cold start: the runs write no
.pyc either (-B). The variants alternate, after one discarded run of each.

Measured per run: `import app` (the handler module), then the DynamoDB client the first
invocation creates (hermes.aws.client, which loads botocore's service model), and the whole
process from start to exit. Plus the layer's files, their size and its zip (what is uploaded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import botocore

from bench.report import load_average
from bench.stats import median, ms
from local.template import ROOT

BEFORE_REV = "d8958b43f907d6b1fd29db48f214d95a1d1ddc6d"  # the lock that held botocore
RUNTIME_PACKAGES = ["boto3", "botocore", "jmespath", "s3transfer", "dateutil", "urllib3", "six.py"]
PIP_LAMBDA = ["--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--implementation",
              "cp", "--python-version", "3.11", "--abi", "cp311"]  # fmt: skip
CHILD = """
import json, os, sys, time
started = time.perf_counter()
import app
imported = time.perf_counter()
from hermes.aws import client
client("dynamodb")
created = time.perf_counter()
import botocore
where = [p for p in sys.path if os.path.exists(os.path.join(p, "botocore", "__init__.py"))]
print(json.dumps({"import_s": imported - started, "client_s": created - imported,
                  "botocore": os.path.dirname(os.path.dirname(botocore.__file__)),
                  "copies": len(where)}))
"""


def run(cmd: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed:\n{result.stdout}{result.stderr}")
    return result


def runtime_packages(tmp: Path) -> Path:
    """boto3 and its dependencies, as the runtime has them: compiled."""
    site, out = Path(botocore.__file__).parent.parent, tmp / "runtime"
    out.mkdir()
    for name in RUNTIME_PACKAGES:
        src = site / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / name)
    run([sys.executable, "-m", "compileall", "-q", out])
    return out


def layer_now(tmp: Path) -> Path:
    sam = Path(sys.executable).parent / "sam"
    out = tmp / "now"
    run([sam, "build", "HermesLayer", "--no-cached", "--build-dir", out], cwd=ROOT,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"})  # fmt: skip
    return out / "HermesLayer" / "python"


def layer_before(tmp: Path, now: Path, rev: str) -> Path:
    lock = tmp / "requirements-before.txt"
    lock.write_text(run(["git", "show", f"{rev}:layers/hermes/requirements.txt"], cwd=ROOT).stdout)
    out = tmp / "before" / "python"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-compile", "--require-hashes", *PIP_LAMBDA, "--target", out, "-r", lock])  # fmt: skip
    shutil.rmtree(out / "bin", ignore_errors=True)
    shutil.copytree(now / "hermes", out / "hermes")
    return out


def size(layer: Path, tmp: Path) -> dict[str, float]:
    files = [p for p in layer.rglob("*") if p.is_file()]
    archive = tmp / f"{layer.parent.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for file in files:
            zipped.write(file, Path("python") / file.relative_to(layer))
    return {
        "files": len(files),
        "mb": sum(p.stat().st_size for p in files) / 1e6,
        "zip_mb": archive.stat().st_size / 1e6,
        "botocore_mb": sum(p.stat().st_size for p in (layer / "botocore").rglob("*") if p.is_file())
        / 1e6,
    }


def cold_start(function: Path, layer: Path, runtime: Path) -> dict[str, float | str]:
    env = {"PATH": os.environ["PATH"], "AWS_DEFAULT_REGION": "us-east-1",
           "PYTHONPATH": os.pathsep.join(map(str, [function, layer, runtime]))}  # fmt: skip
    started = time.perf_counter()
    done = run([sys.executable, "-S", "-B", "-c", CHILD], env=env, cwd=function, timeout=60)
    result: dict[str, float | str] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    owner = {str(layer): "the layer's", str(runtime): "the runtime's"}
    copies = f"{result['copies']} on sys.path" if result["copies"] != 1 else "the only one"
    result["botocore"] = f"{owner.get(str(result['botocore']), result['botocore'])} ({copies})"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--function", default="llm", help="a directory of functions/")
    parser.add_argument("--before-rev", default=BEFORE_REV)
    args = parser.parse_args()
    function = ROOT / "functions" / args.function
    load_start = load_average()
    with TemporaryDirectory() as directory:
        tmp = Path(directory)
        runtime = runtime_packages(tmp)
        now = layer_now(tmp)
        layers = {"before": layer_before(tmp, now, args.before_rev), "now": now}
        sizes = {name: size(layer, tmp) for name, layer in layers.items()}
        samples: dict[str, list[dict[str, float | str]]] = {name: [] for name in layers}
        for layer in layers.values():
            cold_start(function, layer, runtime)  # discarded
        for _ in range(args.runs):
            for name, layer in layers.items():
                samples[name].append(cold_start(function, layer, runtime))
        where = {name: {str(s["botocore"]) for s in runs} for name, runs in samples.items()}
    print(f"functions/{args.function}, median of {args.runs} fresh processes per layer; "
          f"load average {load_start} at the start, {load_average()} at the end\n")  # fmt: skip
    print("| layer | botocore imported | import app | + DynamoDB client | whole process "
          "| layer files / size / zip | of which botocore |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, runs in samples.items():
        figure = {key: median([float(r[key]) for r in runs]) for key in
                  ("import_s", "client_s", "process_s")}  # fmt: skip
        s = sizes[name]
        print(f"| {name} | {', '.join(sorted(where[name]))} | {ms(figure['import_s'], 0)} "
              f"| {ms(figure['client_s'], 0)} | {ms(figure['process_s'], 0)} "
              f"| {s['files']:,} / {s['mb']:.1f} MB / {s['zip_mb']:.1f} MB "
              f"| {s['botocore_mb']:.1f} MB |")  # fmt: skip


if __name__ == "__main__":
    main()
