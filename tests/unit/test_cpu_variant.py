"""The runner picks the llama.cpp CPU backend variant for this machine itself: the most
capable one whose features the CPU reports AND whose registers the OS has enabled.
llama.cpp's own choice reads CPUID only, so a CPU that reports AVX-512 or AMX under an OS
or hypervisor that has not enabled them would get a library that dies with SIGILL."""

from __future__ import annotations

from pathlib import Path

import pytest

from local.cpu_variant import (
    VARIANT_FEATURES,
    XSTATE_AMX,
    XSTATE_AVX512,
    XSTATE_YMM,
    choose,
    os_xstate,
)

# A Sapphire Rapids as /proc/cpuinfo shows it: AVX-512 and AMX reported.
SAPPHIRE_RAPIDS = frozenset(VARIANT_FEATURES["sapphirerapids"] | {"avx_vnni", "xsave"})
ALL_ENABLED = 0b11 | XSTATE_YMM | XSTATE_AVX512 | XSTATE_AMX


@pytest.fixture
def lib_dir(tmp_path: Path) -> Path:
    for variant in VARIANT_FEATURES:  # every variant llama.cpp can build
        (tmp_path / f"libggml-cpu-{variant}.so").touch()
    (tmp_path / "libggml-base.so").touch()
    return tmp_path


def test_with_everything_enabled_the_most_capable_variant_without_amx_is_chosen(
    lib_dir: Path,
) -> None:
    # AMX faults on our VMs even where the CPU, the kernel and arch_prctl all say yes
    choice = choose(lib_dir, SAPPHIRE_RAPIDS, ALL_ENABLED)
    assert choice.variant == "zen4"
    assert "AMX" in choice.passed_over["sapphirerapids"]


def test_amx_reported_but_not_enabled_by_the_os_is_never_chosen(lib_dir: Path) -> None:
    choice = choose(lib_dir, SAPPHIRE_RAPIDS, ALL_ENABLED & ~XSTATE_AMX)
    assert choice.variant == "zen4"


def test_avx512_reported_but_not_enabled_by_the_os_is_named_in_the_log_line(
    lib_dir: Path,
) -> None:
    choice = choose(lib_dir, SAPPHIRE_RAPIDS, 0b11 | XSTATE_YMM)
    assert "icelake" in choice.describe() and "not enabled" in choice.describe()


def test_avx512_reported_but_not_enabled_by_the_os_is_never_chosen(lib_dir: Path) -> None:
    # Given a hypervisor that reports AVX-512 in CPUID but left it out of XCR0
    choice = choose(lib_dir, SAPPHIRE_RAPIDS, 0b11 | XSTATE_YMM)
    assert choice.variant == "alderlake"
    assert not any(f.startswith(("avx512", "amx")) for f in VARIANT_FEATURES[choice.variant])


def test_an_os_that_cannot_say_gets_no_avx512(lib_dir: Path) -> None:
    # A kernel before 5.16 has no ARCH_GET_XCOMP_SUPP: AVX2 at most, never AVX-512 or AMX
    assert choose(lib_dir, SAPPHIRE_RAPIDS, None).variant == "alderlake"


def test_a_cpu_without_avx_gets_the_baseline(lib_dir: Path) -> None:
    assert choose(lib_dir, frozenset({"sse2"}), ALL_ENABLED).variant == "x64"


def test_only_the_variants_present_are_candidates(tmp_path: Path) -> None:
    for variant in ("x64", "haswell", "skylakex", "icelake"):  # what the Makefile builds
        (tmp_path / f"libggml-cpu-{variant}.so").touch()
    assert choose(tmp_path, SAPPHIRE_RAPIDS, ALL_ENABLED).variant == "icelake"
    assert choose(tmp_path, SAPPHIRE_RAPIDS, 0b11 | XSTATE_YMM).variant == "haswell"


def test_a_single_library_build_is_left_to_llama_cpp(tmp_path: Path) -> None:
    (tmp_path / "libggml-cpu.so").touch()
    assert choose(tmp_path, SAPPHIRE_RAPIDS, ALL_ENABLED).path is None


def test_this_linux_reports_its_enabled_register_state() -> None:
    xstate = os_xstate()
    assert xstate is None or xstate & 0b11 == 0b11  # x87 and SSE are always on
