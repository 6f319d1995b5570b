"""Prepare llama-cpp-python's sdist for the portable build (`make`, see the Makefile):
unpack it and keep only the x86-64 CPU backend variants we ship.

llama.cpp's GGML_CPU_ALL_VARIANTS builds 14 x86 variants of its CPU backend, each a full
compile of ggml-cpu (about 1.5 min on 2 cores apiece); the library best suited to the CPU
is chosen when the model loads (see local/cpu_variant.py). Four cover the machines we meet:

    x64       any x86-64 (SSE2): the floor, so one build runs everywhere
    haswell   x86-64-v3: AVX2, FMA, F16C, BMI2 (every x86 server since about 2015)
    skylakex  x86-64-v4: AVX-512 F/CD/VL/DQ/BW
    icelake   + AVX-512 VBMI and VNNI (Ice Lake and later, Sapphire Rapids, Zen 4/5)

Left out on purpose: sapphirerapids, the only variant with AMX code. On our own VMs the
CPU reports AMX, the kernel reports its tile state enabled and grants the permission, and
the first AMX instruction still dies with SIGILL (a native build crashes there on its first
token); AMX also only speeds up prompt processing. The in-between variants (sse42 ..
piledriver, cannonlake, cascadelake, cooperlake, zen4, alderlake) would each cost another
1.5 minutes of build for a few percent of speed on the CPUs that would pick them.

Only CMake lines are removed; no C or C++ source is changed. Fails loudly when the file no
longer looks as expected (a version bump), rather than building something else.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

VARIANTS_FILE = "vendor/llama.cpp/ggml/src/CMakeLists.txt"
X86_VARIANT = re.compile(
    r"^\s*ggml_add_cpu_backend_variant\((?P<name>x64|sse42|sandybridge|ivybridge|piledriver|"
    r"haswell|skylakex|cannonlake|cascadelake|icelake|cooperlake|zen4|alderlake|"
    r"sapphirerapids)\b.*$",
    re.MULTILINE,
)


def keep_only(cmake: str, keep: set[str]) -> str:
    found = {m["name"] for m in X86_VARIANT.finditer(cmake)}
    if len(found) != 14 or not keep <= found:
        sys.exit(f"unexpected x86 CPU variants in {VARIANTS_FILE}: {sorted(found)}")
    return X86_VARIANT.sub(
        lambda m: m[0] if m["name"] in keep else f"# (portable build) {m[0].strip()}", cmake
    )


def main() -> None:
    sdist, target, *keep = sys.argv[1:]
    with tarfile.open(sdist) as archive:
        archive.extractall(target, filter="data")
    (source,) = Path(target).iterdir()  # the sdist's one top directory
    path = source / VARIANTS_FILE
    path.write_text(keep_only(path.read_text(), set(keep)))
    print(source)


if __name__ == "__main__":
    main()
