"""Which of llama.cpp's CPU backend variants this machine may run.

The portable build (Makefile, local/llama_cpp_source.py) ships the ggml CPU backend as
several libraries, `libggml-cpu-<variant>.so`, next to libllama. llama.cpp would pick one
itself (ggml_backend_load_all), but it cannot find them there (it searches the
executable's directory and the working directory), and its choice reads CPUID only — its
own source says "FIXME: this does not check for OS support". A CPU can report AVX-512 or
AMX while the OS (or the hypervisor below it) has not enabled their register state; an
instruction using them then dies with SIGILL. So the runner chooses here and hands the
one library to llama.cpp through GGML_BACKEND_PATH, never loading the others:

- the CPU must report each feature the variant was compiled for (/proc/cpuinfo, which the
  kernel also clears of features it disabled), and
- the OS must have enabled the register state those features use: the xstate components
  Linux reports with arch_prctl(ARCH_GET_XCOMP_SUPP) (kernel 5.16+; XCR0 as the kernel
  set it). Without that call, AVX-512 is treated as not enabled;
- never AMX. On our own VMs (Firecracker, kernel 6.18) the CPU reports AMX, the kernel
  reports its tile state enabled and grants ARCH_REQ_XCOMP_PERM, and the first `tilezero`
  still dies with SIGILL: a natively built llama.cpp crashes there on its first token. No
  check a process can make tells, so the build has no AMX variant and none is chosen.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

# Compile-time features of each x86 variant, as /proc/cpuinfo names them (from
# GGML_CPU_ALL_VARIANTS in llama.cpp's ggml/src/CMakeLists.txt and the -m flags that
# ggml/src/ggml-cpu/CMakeLists.txt adds for each; AVX512 there means F, CD, VL, DQ, BW).
_V3 = frozenset({"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"})
_V4 = _V3 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
VARIANT_FEATURES: dict[str, frozenset[str]] = {
    "x64": frozenset(),
    "sse42": frozenset({"sse4_2"}),
    "sandybridge": frozenset({"sse4_2", "avx"}),
    "ivybridge": frozenset({"sse4_2", "avx", "f16c"}),
    "piledriver": frozenset({"sse4_2", "avx", "f16c", "fma"}),
    "haswell": _V3,
    "alderlake": _V3 | {"avx_vnni"},
    "skylakex": _V4,
    "cannonlake": _V4 | {"avx512vbmi"},
    "cascadelake": _V4 | {"avx512_vnni"},
    "icelake": _V4 | {"avx512vbmi", "avx512_vnni"},
    "cooperlake": _V4 | {"avx512_vnni", "avx512_bf16"},
    "zen4": _V4 | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
    "sapphirerapids": _V4 | {"avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"},
}

# XSAVE state components (bits of XCR0) that instructions of these features use.
XSTATE_YMM = 1 << 2
XSTATE_AVX512 = (1 << 5) | (1 << 6) | (1 << 7)  # opmask, ZMM_Hi256, Hi16_ZMM
XSTATE_AMX = (1 << 17) | (1 << 18)  # XTILECFG, XTILEDATA


def xstate_needed(features: frozenset[str]) -> int:
    needed = 0
    if features & {"avx", "avx2", "fma", "f16c", "avx_vnni"}:
        needed |= XSTATE_YMM
    if any(f.startswith("avx512") for f in features):
        needed |= XSTATE_YMM | XSTATE_AVX512
    if any(f.startswith("amx") for f in features):
        needed |= XSTATE_AMX
    return needed


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    match = re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.MULTILINE)
    return frozenset(match[1].split()) if match else frozenset()


def os_xstate() -> int | None:
    """The xstate components the kernel enabled for user space, or None when it cannot say
    (not Linux x86-64, or a kernel before 5.16)."""
    arch_prctl, get_xcomp_supp = 158, 0x1021  # SYS_arch_prctl, ARCH_GET_XCOMP_SUPP
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_uint64(0)
        if libc.syscall(arch_prctl, get_xcomp_supp, ctypes.byref(mask)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return mask.value


def fallback_xstate(flags: frozenset[str]) -> int:
    """Without the kernel's answer: x87/SSE always, AVX's state when the kernel lists avx
    (it clears avx when XSAVE is off), never AVX-512's or AMX's."""
    return 0b11 | (XSTATE_YMM if {"avx", "xsave"} <= flags else 0)


@dataclass
class Choice:
    path: Path | None  # None: no variant libraries (an older, single-library build)
    variant: str = ""
    passed_over: dict[str, str] = field(default_factory=dict)  # variant → why not

    def describe(self) -> str:
        if self.path is None:
            return "llama.cpp CPU backend: a single library (no runtime CPU dispatch)"
        text = f"llama.cpp CPU backend: {self.variant} ({self.path.name})"
        unsafe = sorted(v for v, why in self.passed_over.items() if why.startswith("the OS"))
        if unsafe:
            text += f"; not {', '.join(unsafe)}: {self.passed_over[unsafe[0]]}"
        return text


def choose_for_this_machine(lib_dir: Path) -> Choice:
    return choose(lib_dir, cpu_flags(), os_xstate())


def choose(lib_dir: Path, flags: frozenset[str], xstate: int | None) -> Choice:
    """The most capable variant in `lib_dir` that a CPU with `flags` supports and whose
    registers an OS that enabled `xstate` (None: unknown) lets it use."""
    libraries = {
        p.name[len("libggml-cpu-") : -len(".so")]: p for p in lib_dir.glob("libggml-cpu-*.so")
    }
    if not libraries:
        return Choice(None)
    enabled = fallback_xstate(flags) if xstate is None else xstate
    best: tuple[int, str] | None = None
    passed_over: dict[str, str] = {}
    for name in libraries:
        features = VARIANT_FEATURES.get(name)
        if features is None:
            passed_over[name] = "unknown variant"
            continue
        missing = features - flags
        if missing:
            passed_over[name] = "CPU lacks " + " ".join(sorted(missing))
            continue
        needed = xstate_needed(features)
        if needed & XSTATE_AMX:
            passed_over[name] = "AMX: may fault even where the OS says it is enabled"
            continue
        if needed & ~enabled:
            passed_over[name] = f"the OS has not enabled their registers (xstate {enabled:#x})"
            continue
        if best is None or len(features) > best[0]:
            if best is not None:
                passed_over[best[1]] = "a better one fits"
            best = (len(features), name)
        else:
            passed_over[name] = "a better one fits"
    if best is None:
        raise RuntimeError(f"no llama.cpp CPU backend in {lib_dir} runs here: {passed_over}")
    return Choice(libraries[best[1]], best[1], passed_over)


def llama_cpp_lib_dir() -> Path | None:
    """llama_cpp's shared libraries, found without importing it (that would load them)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"
