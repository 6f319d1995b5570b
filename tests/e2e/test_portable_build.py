"""The installed llama.cpp runs on any x86-64: built without native flags, with its CPU
backend in variants chosen at load time, and no library holding instructions beyond what
its name promises (read from the machine code itself, with objdump). A native build fails
here: GGML_NATIVE is recorded ON and its one CPU library is full of AVX-512 and AMX."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from local.cpu_variant import llama_cpp_lib_dir
from local.template import ROOT

pytestmark = pytest.mark.real_model

# What an instruction needs, from its registers and mnemonic (objdump's AT&T syntax).
AMX = re.compile(r"%tmm\d|\btile\w*|\btdp\w+|\bldtilecfg|\bsttilecfg")
AVX512 = re.compile(r"%zmm\d|%k[0-7]\b|\{%k[0-7]\}")
AVX = re.compile(r"^v\w+\s.*%[xyz]mm\d|^vzero")  # VEX-encoded: every AVX instruction starts with v

# Most a library may need: the x86-64 baseline, AVX (incl. AVX2), AVX-512; AMX never.
ALLOWED = {"x64": "baseline", "haswell": "avx", "skylakex": "avx512", "icelake": "avx512"}


def makefile_variants() -> set[str]:
    match = re.search(r"^LLAMA_CPP_VARIANTS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "LLAMA_CPP_VARIANTS is not set in the Makefile"
    return set(match[1].split())


@pytest.fixture(scope="module")
def lib_dir() -> Path:
    found = llama_cpp_lib_dir()
    assert found is not None and found.is_dir(), "llama_cpp is not installed: run make install"
    return found


def libraries(lib_dir: Path) -> list[Path]:
    """Each shared library once (the .so.N and .so.N.M.K names are links or copies)."""
    return sorted(p for p in lib_dir.glob("*.so") if p.is_file())


def instructions(library: Path) -> Iterator[str]:
    with subprocess.Popen(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], stdout=subprocess.PIPE, text=True
    ) as objdump:
        assert objdump.stdout is not None
        for line in objdump.stdout:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0].strip().endswith(":"):
                yield parts[-1].strip()


@cache
def needs(library: Path) -> str:
    """The most this library's machine code needs: baseline, avx, avx512 or amx."""
    level = "baseline"
    for instruction in instructions(library):
        if AMX.search(instruction):
            return "amx"
        if AVX512.search(instruction):
            level = "avx512"
        elif level == "baseline" and AVX.search(instruction):
            level = "avx"
    return level


def test_the_build_records_no_native_flags_and_runtime_dispatch(lib_dir: Path) -> None:
    config = lib_dir.parent.parent / "lib" / "cmake" / "ggml" / "ggml-config.cmake"
    flags = dict(re.findall(r'^set\((GGML_\w+) "([^"]*)"\)', config.read_text(), re.M))
    assert flags["GGML_NATIVE"] == "OFF"
    assert (flags["GGML_BACKEND_DL"], flags["GGML_CPU_ALL_VARIANTS"]) == ("ON", "ON")


def test_the_cpu_backend_comes_in_the_variants_the_makefile_names(lib_dir: Path) -> None:
    variants = {p.name[len("libggml-cpu-") : -len(".so")] for p in lib_dir.glob("libggml-cpu-*.so")}
    assert variants == makefile_variants()
    assert not (lib_dir / "libggml-cpu.so").exists()  # the single library of a native build
    assert variants <= ALLOWED.keys()


def test_no_library_holds_instructions_beyond_its_variant(lib_dir: Path) -> None:
    order = ["baseline", "avx", "avx512", "amx"]
    found = {}
    for library in libraries(lib_dir):
        variant = library.name.removeprefix("libggml-cpu-").removesuffix(".so")
        allowed = ALLOWED.get(variant, "baseline")  # libllama, libggml, ...: the baseline
        found[library.name] = needs(library)
        assert order.index(found[library.name]) <= order.index(allowed), (library, allowed)
    # The variants do use what they were built for (else the check above proves nothing).
    assert found["libggml-cpu-haswell.so"] == "avx"
    assert found["libggml-cpu-skylakex.so"] == "avx512"
