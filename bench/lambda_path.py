"""A Lambda-like import path for cold-start runs: the packages a layer built from
layers/hermes/requirements.txt would hold plus the runtime's boto3, and nothing else.

The venv also holds the dev tools, and some libraries import optional extras just because
they are installed (httpx its CLI with rich and click, botocore awscrt and pyOpenSSL), which
a deployed function would not pay. The packages are symlinked from the venv into one
directory, so the very same files are imported."""

from __future__ import annotations

from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from local.template import ROOT

REQUIREMENTS = ROOT / "layers" / "hermes" / "requirements.in"  # what the layer asks for
RUNTIME_PROVIDED = ["boto3"]  # the Lambda Python runtime ships boto3 and its dependencies


def _requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line] + RUNTIME_PROVIDED


def _closure(requirements: list[str]) -> list[Distribution]:
    """The installed distributions these requirements need, without optional extras."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, Distribution] = {}
    pending = list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        key = canonicalize_name(requirement.name)
        if key in found:
            continue
        found[key] = dist = distribution(requirement.name)
        for needed in dist.requires or []:
            marker = Requirement(needed).marker
            if marker is None or marker.evaluate({"extra": ""}):
                pending.append(needed)
    return list(found.values())


def _top_level(dist: Distribution) -> set[str]:
    """The names a distribution installs at the root of site-packages (packages, modules)."""
    names = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".pth")):
            continue
        names.add(first)
    return names


def build(directory: Path) -> Path | None:
    """Symlink the closure's top-level packages into `directory`/site; None when the
    venv lacks what is needed to work it out (then the comparison is skipped)."""
    try:
        dists = _closure(_requirements())
    except (ImportError, PackageNotFoundError):
        return None
    site = directory / "lambda-site"
    site.mkdir(exist_ok=True)
    for dist in dists:
        for name in _top_level(dist):
            link = site / name
            if not link.exists():
                link.symlink_to(Path(str(dist.locate_file(name))))
    return site
