"""The tolerance policy of every numerical comparison in the tests, written once (docs/numerics.md).

Two computations that are equal in exact arithmetic but round in a different order (two engines,
a split and an unsplit network, Ray and one process, secure and plain averaging) agree only up to
rounding, and how far rounding moves a result depends on the CPU's kernels (summation order,
vector width, fused multiply-adds). A tolerance tuned on one machine therefore fails on the next
(issue 33: 1.22e-5 against a hand-picked 1e-5 on an Intel Xeon). The rules:

1. **Compare in float64** (``compute.precision: fp64``, ``Execution(precision="fp64")``, or
   ``.double()`` on a module): weights, activations, optimiser states and losses in float64, from
   the fp32 initial weights, data and noise cast exactly. Summation order then moves results by
   at most about ``AMPLIFICATION * U64`` (relative), and ``assert_close64`` allows ``TOL64``, 1e3
   times that and 4e7 times below a real bug's effect (a client run through the wrong server body
   moves its outputs by 0.72; ``test_cluster_bodies`` shows the comparison catching it).
2. **fp32 against its own rounding** (``assert_within_rounding``), where a comparison must stay
   in fp32 (the Ray audit counts fp32 bytes; a pipeline has no fp64 path): the tolerance is
   ``ROUNDING_FACTOR`` times the gap between the fp32 and the fp64 run of the reference, i.e. the
   rounding error this computation shows on this CPU, measured in the same test.
3. **Bit for bit** (``rtol=0, atol=0``) where both sides run the same operations in the same
   order in one process (a resumed run, the loop's generator recompute, a checkpoint round trip).
4. **Fixed point**: secure aggregation rounds each term to ``2**-32`` (``federation.secure``), an
   error bounded by ``fixed_point_bound``; it is added to the float tolerance of rule 1, times
   ``AMPLIFICATION`` where training ran on top of it (Adam amplifies it as it does rounding).
5. **bf16** against fp32: ``BF16_TOL``, a multiple of bf16's unit roundoff (8 bits of mantissa).
6. **Records**: values read back from ``metrics.jsonl`` carry its rounding, ``RECORD_ROUNDING``.
"""

from __future__ import annotations

import numpy as np
import torch

U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff: 2**-24 ~ 6.0e-8
U64 = torch.finfo(torch.float64).eps / 2  # 2**-53 ~ 1.1e-16
U_BF16 = torch.finfo(torch.bfloat16).eps / 2  # 2**-8 ~ 3.9e-3

# The largest growth of rounding error this suite's comparisons show, in units of unit roundoff
# times the values' size. Adam is the amplifier: its step lr * m / (sqrt(v) + eps) turns the
# relative rounding error of a near-zero gradient into an absolute weight error of order lr. Measured
# by ``python benchmarks/bench_tolerances.py`` as max|fp32 - fp64| / U32 after 3 iterations: 1.9e4
# (AVX512 kernels), 2.2e4 (ATEN_CPU_CAPABILITY=default, oneDNN SSE4.1), 1.9e4 (AVX2); untrained,
# it is 8 (docs/numerics.md). 1e5 leaves 4.5x headroom.
AMPLIFICATION = 1e5
# 1e3 times the largest expected float64 gap (AMPLIFICATION * U64 ~ 1.1e-11 per unit of size;
# measured at most 3.8e-12, under ATEN_CPU_CAPABILITY=default), yet 4e7 times smaller than the
# effect of a real bug (a client run through another cluster body: 0.72): a CPU whose kernels round
# differently cannot fail it, and a wrong result cannot pass it.
TOL64 = 1e3 * AMPLIFICATION * U64  # ~ 1.1e-8
# Two fp32 runs that round in different orders each deviate from the exact result by about the
# fp32-vs-fp64 gap; their difference is at most twice that, and the max over many elements
# fluctuates by a small factor more.
ROUNDING_FACTOR = 8.0
BF16_TOL = 8 * U_BF16  # ~ 0.031: bf16 forward passes against fp32, one training step


def _flat(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy().ravel()
    return np.asarray(x, dtype=np.float64).ravel()


def gap(a, b) -> float:
    """max |a - b| over all elements (tensors, arrays, lists of numbers)."""
    a, b = _flat(a), _flat(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def assert_close64(a, b, *, extra: float = 0.0, scale: float = 1.0, msg: str = "") -> None:
    """Rule 1: float64 results equal up to ``TOL64`` relative to ``scale`` and the values' size
    (plus ``extra``, a bounded error of another kind, e.g. ``fixed_point_bound``)."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == torch.float64 and b.dtype == torch.float64, f"{msg}: rule 1 compares float64, " \
            f"got {a.dtype} and {b.dtype}"
    fb = _flat(b)
    size = max(scale, float(np.abs(fb).max()) if fb.size else 0.0)
    tol = TOL64 * size + extra
    g = gap(a, fb)
    assert g <= tol, f"{msg}: max |a - b| = {g:.3g} > {tol:.3g} (float64 rule: TOL64 x {size:.3g} + {extra:.3g})"


def assert_losses_close64(a: list[dict], b: list[dict], msg: str = "") -> None:
    """Per-iteration {client: (L_D, L_G)} dicts (or metrics rows' per-client lists): the same
    clients, the same losses under rule 1."""
    assert [sorted(x) for x in a] == [sorted(x) for x in b], msg
    for la, lb in zip(a, b):
        for i in la:
            assert_close64(la[i], lb[i], msg=f"{msg} client {i}")


def assert_within_rounding(a32, b32, b64, *, factor: float = ROUNDING_FACTOR, extra: float = 0.0,
                           msg: str = "") -> None:
    """Rule 2: fp32 results ``a32`` and ``b32`` of one computation in two summation orders differ
    by at most ``factor`` times the rounding error ``b32`` shows against its float64 run ``b64``
    (floored at one unit roundoff of the values, for a computation that happens to be exact), plus
    ``extra`` (a bounded error of another kind, e.g. ``RECORD_ROUNDING``)."""
    err = max(gap(b32, b64), U32 * float(np.abs(_flat(b64)).max()))
    g = gap(a32, b32)
    assert g <= factor * err + extra, (f"{msg}: max |a - b| = {g:.3g} > {factor} x {err:.3g} + {extra:.3g} (the fp32 "
                                       f"rounding error of the reference against its float64 run)")


# metrics.jsonl keeps per-client losses to 5 decimals: two values that differ by less than that
# can still be written 1e-5 apart
RECORD_ROUNDING = 1e-5


def fixed_point_bound(terms: int, scale_bits: int = 32) -> float:
    """Rule 4: the most that summing ``terms`` values each rounded to ``2**-scale_bits`` moves the sum."""
    return terms * 2.0 ** -(scale_bits + 1)
