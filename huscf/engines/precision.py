"""Which precision runs fast on this hardware: bf16 only where it is computed natively.

``compute.precision: bf16`` runs the forward passes under ``torch.autocast`` in bfloat16. That
pays only where the hardware multiplies bf16 natively:

* CUDA: GPUs of compute capability 8.0 and later (``torch.cuda.is_bf16_supported``);
* x86 CPUs with AVX512-BF16 or AMX (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids
  and later). On this project's AMD EPYC (Zen 4) bf16 ran 1.4-1.7x the fp32 loop at the
  paper's scale (docs/performance.md).

Elsewhere oneDNN emulates bf16 through fp32 and it is *slower* than fp32: 0.48x the fp32 loop
on a 2-core Intel Xeon (2.8 GHz) without AVX512-BF16 (issue 33; docs/performance.md). So
``precision: auto`` picks bf16 only where it is native, and an explicit ``bf16`` on a CPU
without it runs but says why it will be slow, in the run's first line.

torch says what the CPU has through ``torch.cpu`` (the flags cpuinfo reads); where a torch build
lacks those functions, the Linux CPU flags stand in. oneDNN, which runs torch's bf16 matmuls and
convolutions on a CPU, can be held below the CPU's instruction set (``ONEDNN_MAX_CPU_ISA``); held
below AVX512_CORE_BF16 it emulates bf16 even on a CPU that has it (measured: 0.37x the fp32 loop
on the AMD EPYC above with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``), so that counts as not native.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# environment variables that choose torch's CPU kernels (ATen's vector width, oneDNN's and MKL's
# instruction sets): docs/numerics.md runs the tests under several
KERNEL_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# the x86 CPU flags (as Linux names them) that make bf16 matmuls native
_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN instruction-set caps that leave out bf16 dot products (its ISA names, lowest first)
_ONEDNN_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    reason: str  # what was found, in a few words (printed in the run's first line)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def bf16_support(device: str | torch.device) -> Bf16Support:
    """Whether ``device`` computes bf16 natively, and why we think so."""
    dev = torch.device(device)
    if dev.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        why = "GPU has native bf16" if native else "GPU has no native bf16 (compute capability < 8.0)"
        return Bf16Support(native, why)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is not None and amx is not None:
        found = [name for name, has in (("AVX512-BF16", avx512_bf16()), ("AMX", amx())) if has]
    else:  # an older or newer torch without these probes: the kernel's list of CPU flags
        flags = _cpu_flags()
        found = [f.upper().replace("_", "-") for f in _NATIVE_FLAGS if f in flags]
    cap = next((os.environ[k].strip().upper() for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
                if os.environ.get(k)), "")
    if found and cap in _ONEDNN_WITHOUT_BF16:
        return Bf16Support(False, f"CPU has native bf16 ({' and '.join(found)}) but ONEDNN_MAX_CPU_ISA={cap} "
                                  "keeps oneDNN from it: bf16 is emulated, slower than fp32")
    if found:
        return Bf16Support(True, f"CPU has native bf16 ({' and '.join(found)})")
    return Bf16Support(False, "CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 is emulated, slower than fp32")


def cpu_kernels() -> str:
    """The CPU kernels torch runs and the kernel variables that chose them, for a benchmark's
    first line (``kernels AVX512`` or ``kernels DEFAULT, ATEN_CPU_CAPABILITY=default, ...``)."""
    return f"kernels {torch.backends.cpu.get_cpu_capability()}" + "".join(
        f", {k}={os.environ[k]}" for k in KERNEL_VARS if os.environ.get(k))


def choose_precision(requested: str, device: str | torch.device) -> tuple[str, str]:
    """``requested`` (fp32, bf16, fp64 or auto) as a concrete precision, with a note for the run's
    first line: why auto chose what it chose, or a warning for bf16 where it is emulated."""
    if requested not in ("auto", "bf16"):
        return requested, ""
    support = bf16_support(device)
    if requested == "auto":
        return ("bf16" if support.native else "fp32"), f"auto: {support.reason}"
    return "bf16", ("" if support.native else f"warning: {support.reason}; use fp32 or auto")
