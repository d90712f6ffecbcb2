"""Which precision extraction runs at, and what the CPU's flags (or the GPU) offer.

`extract.precision=auto` is fp32 on every CPU: the same rows, so the same figures, whatever the CPU lists (bf16's
rows differ from fp32's, and differ between CPUs that run it natively and those that emulate it). What a cheaper
precision would give is one flag away (`extract.precision=bf16-mixed`, `int8`), and the reason auto gives says
whether this CPU runs bf16 natively (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo; elsewhere PyTorch emulates
it, far slower than fp32) and whether it measured faster for this model (`model.bf16_pays`, from `python -m
imgret.bench --parts precision`). On a GPU auto is fp16 mixed precision. The choice, its reason and the CPU's
relevant flags become the run's tags.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# Instructions that run bf16 and int8 matrix products natively (x86: AVX512 / AVX-VNNI / AMX)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
PRECISION_FLAGS = ("avx2", "fma", "avx512f", *BF16_FLAGS, *INT8_FLAGS)


def cpu_info(cpuinfo: str | None = None) -> dict[str, str]:
    """The CPU's model name and flags, from /proc/cpuinfo (or the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "flags": fields.get("flags", "")}


# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, from least to most; DNNL_MAX_CPU_ISA is its older name) and the flags each
# level adds to those the kernels may use: below a level, PyTorch's oneDNN never runs that level's instructions,
# so bf16 is emulated under AVX2 even on a CPU that lists avx512_bf16.
ONEDNN_ISA_ADDS = (("SSE41", ()), ("AVX", ()), ("AVX2", ("avx2", "fma")), ("AVX2_VNNI", ("avx_vnni",)),
                   ("AVX2_VNNI_2", ()), ("AVX512_CORE", ("avx512f",)), ("AVX512_CORE_VNNI", ("avx512_vnni",)),
                   ("AVX512_CORE_BF16", ("avx512_bf16",)), ("AVX10_1_512", ()), ("AVX512_CORE_FP16", ()),
                   ("AVX10_1_512_AMX", ("amx_bf16", "amx_int8")), ("AVX512_CORE_AMX", ("amx_bf16", "amx_int8")))


def isa_capped(flags: frozenset[str], cap: str | None) -> frozenset[str]:
    """`flags` less those oneDNN may not use under the ISA cap `cap` (None, "", "ALL" or an unknown name: no cap)."""
    names = [name for name, _ in ONEDNN_ISA_ADDS]
    cap = (cap or "").strip().upper()
    if cap not in names:
        return flags
    barred = {flag for name, added in ONEDNN_ISA_ADDS[names.index(cap) + 1:] for flag in added}
    allowed = {flag for name, added in ONEDNN_ISA_ADDS[:names.index(cap) + 1] for flag in added}
    return frozenset(flag for flag in flags if flag not in barred or flag in allowed)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU flags extraction may use: this machine's (empty where /proc/cpuinfo cannot be read), less those
    above the ISA cap that ONEDNN_MAX_CPU_ISA sets."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return isa_capped(frozenset(cpu_info()["flags"].split()), cap)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # what Lightning's Trainer and the Embedder run: 32-true | bf16-mixed | 16-mixed
    reason: str     # one line: why, for the log and the run's tags
    flags: str      # the CPU's flags that decide it, as listed in /proc/cpuinfo ("none" if none)

    def tags(self) -> dict[str, str]:
        return {"extract_precision": self.precision, "extract_precision_reason": self.reason,
                "cpu_precision_flags": self.flags}


def choose_precision(requested: str, device: str, bf16_pays: bool | None,
                     flags: frozenset[str] | set[str] | None = None) -> PrecisionChoice:
    """The precision for `requested` (a precision, or auto) on `device`, for a model whose bf16 speed-up was
    measured (`bf16_pays`: true, false, or None when never measured), given the CPU's `flags` (this machine's
    by default: tests feed their own)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    listed = " ".join(flag for flag in PRECISION_FLAGS if flag in flags) or "none"
    if requested != "auto":
        return PrecisionChoice(str(requested), "asked for (extract.precision)", listed)
    if device == "cuda":
        return PrecisionChoice("16-mixed", "auto on a GPU: fp16 mixed precision", listed)
    native = [flag for flag in BF16_FLAGS if flag in flags]
    same = "auto: fp32, the same rows on every CPU"
    if not native:
        return PrecisionChoice("32-true", f"{same} (this one lists no bf16 instructions, avx512_bf16 or amx_bf16: "
                               "bf16 would be emulated and slower)", listed)
    if bf16_pays:
        return PrecisionChoice("32-true", f"{same}; this one has {native[0]} and bf16 measured faster for this model "
                               "(model.bf16_pays=true; `python -m imgret.bench --parts precision` says by how much and "
                               "at what recall): extract.precision=bf16-mixed runs it, with other rows", listed)
    measured = "measured slower than fp32" if bf16_pays is False else "never measured"
    return PrecisionChoice("32-true", f"{same}; this one has {native[0]}, bf16 {measured} for this model", listed)
