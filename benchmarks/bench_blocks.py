"""The clients' own copies of a block, run for N clients at once: which way the hardware likes best.

Run:  python benchmarks/bench_blocks.py [--device cuda] [--clients 40 80] [--precision fp32 bf16]
                                        [--batch 64] [--iters 20]

In the batched engine, the clients that hold their own copy of a block run it as one call vmapped
over their stacked weights, which PyTorch turns into a grouped convolution. At 40-80 clients on an
H100 that is where the GPU time goes (docs/performance.md). For each convolution of cgan28 at
width 1 (the paper's sizes, read from ``huscf.models``) this times forward + backward (input and
weight gradients) of three ways to run it for N clients with N different weights:

* ``vmap`` - the engine's default (``torch.func.vmap``: cuDNN / oneDNN grouped convolutions);
* ``bmm``  - one batched matmul over the clients: unfold (im2col) + bmm for a convolution,
             bmm + fold (col2im) for a transposed one;
* ``loop`` - one ordinary convolution per client.

and three ways to run per-client BatchNorm (training statistics, each client's own weights):
``vmap``, ``fold`` (clients folded into the channels: one ``batch_norm`` over N x C channels) and
``manual`` (mean and variance over each client's rows, written out).

On CUDA each variant's forward + backward is captured once as a CUDA graph and replayed, as the
engine runs, so launch costs do not count; times are medians of ``--iters`` replays. Before timing,
every variant's output and gradients are compared with ``vmap``'s, allowing 8 times the larger of
the rounding errors the two show against float64 runs of themselves (tests/numerics.py, rule 2: no
tolerance tuned on one machine; both sides', as the variants sum differently: a loop's bias
gradient rounds 8x more than vmap's); a mismatch is an error (exit 1).
Printed per layer: milliseconds, TFLOP/s of the convolution's FLOPs, the allocator's peak on CUDA,
and the fastest variant against ``vmap``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tolerance policy (tests/numerics.py)

import torch  # noqa: E402
from numerics import ROUNDING_FACTOR, U32, U_BF16, gap  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import vmap  # noqa: E402

from huscf.engines.client_ops import CONV_WAYS, client_conv, folded_batch_norm  # noqa: E402
from huscf.models.cgan import ARCHITECTURES  # noqa: E402


class Layer(NamedTuple):
    name: str
    transposed: bool
    cin: int
    cout: int
    k: int
    s: int
    p: int
    op: int  # output padding (transposed only)
    size: int  # input height = width

    @property
    def out_size(self) -> int:
        if self.transposed:
            return (self.size - 1) * self.s - 2 * self.p + self.k + self.op
        return (self.size + 2 * self.p - self.k) // self.s + 1

    def flops(self, n: int, batch: int) -> float:
        """Forward + input gradient + weight gradient: 3 x the forward's multiply-adds x 2."""
        positions = self.size ** 2 if self.transposed else self.out_size ** 2
        return 3 * 2 * n * batch * self.cin * self.cout * self.k ** 2 * positions

    def weight_shape(self) -> tuple[int, ...]:
        return (self.cin, self.cout, self.k, self.k) if self.transposed else (self.cout, self.cin, self.k, self.k)


def cgan28_layers() -> list[Layer]:
    """The middle convolutions of the paper's generator and discriminator (width 1)."""
    arch = ARCHITECTURES["cgan28"]
    layers, (cin, size) = [], arch.g_start
    for cout, k, s, p, op in arch.g_middle:
        layer = Layer(f"G convT {cin}-{cout} k{k} s{s}", True, cin, cout, k, s, p, op, size)
        layers.append(layer)
        cin, size = cout, layer.out_size
    cin, k, s, p = arch.d_head
    size = (arch.image_shape[1] + 2 * p - k) // s + 1
    for cout, k, s, p in arch.d_middle:
        layer = Layer(f"D conv {cin}-{cout} k{k} s{s}", False, cin, cout, k, s, p, 0, size)
        layers.append(layer)
        cin, size = cout, layer.out_size
    return layers


# -- the variants: huscf.engines.client_ops, as the batched engine runs them --------------------------
def _conv_module(layer: Layer) -> torch.nn.Module:
    if layer.transposed:
        return torch.nn.ConvTranspose2d(layer.cin, layer.cout, layer.k, layer.s, layer.p, layer.op)
    return torch.nn.Conv2d(layer.cin, layer.cout, layer.k, layer.s, layer.p)


def bn_vmap(x, g, b):
    return vmap(lambda xi, gi, bi: F.batch_norm(xi, None, None, gi, bi, training=True))(x, g, b)


@functools.lru_cache
def _batch_norm(channels: int) -> torch.nn.BatchNorm2d:
    """The layer whose settings (eps) the folded call reads; built once, outside the timed calls."""
    return torch.nn.BatchNorm2d(channels, track_running_stats=False)


def bn_fold(x, g, b):
    return folded_batch_norm(x, _batch_norm(x.shape[2]), {"weight": g, "bias": b})


def bn_manual(x, g, b, eps: float = 1e-5):
    var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=0, keepdim=True)
    n, _, c = x.shape[:3]
    return (x - mean) * torch.rsqrt(var + eps) * g.view(n, 1, c, 1, 1) + b.view(n, 1, c, 1, 1)


BNS = {"vmap": bn_vmap, "fold": bn_fold, "manual": bn_manual}


# -- timing ----------------------------------------------------------------------------------------
def fwd_bwd(fn, inputs, grad_out, autocast):
    with autocast():
        out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


def close(a, a64, ref, ref64, unit: float) -> bool:
    """``a`` within ROUNDING_FACTOR times the larger rounding error of ``a`` and ``ref`` against their
    float64 runs (floored at one unit roundoff ``unit`` of the values)."""
    err = max(gap(a, a64), gap(ref, ref64), unit * float(ref64.detach().abs().max()))
    return gap(a, ref) <= ROUNDING_FACTOR * err


def run_case(fn, inputs, grad_out, autocast, device, iters):
    """(median ms of forward + backward, peak MiB on CUDA, the results of one run)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-ups on a side stream, as before a capture
            for _ in range(2):
                fwd_bwd(fn, inputs, grad_out, autocast)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            results = fwd_bwd(fn, inputs, grad_out, autocast)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() / 2**20
        results = tuple(r.clone() for r in results)
        del graph
        return statistics.median(times), peak, results
    results = fwd_bwd(fn, inputs, grad_out, autocast)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fwd_bwd(fn, inputs, grad_out, autocast)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None, results


def time_variants(fns: dict, inputs, grad_out, autocast, device, iters: int, unit: float, what: str):
    """Each of ``fns`` timed on ``inputs``; the first is the reference the others must reproduce
    (outputs and gradients) up to its own rounding (``unit``: the precision's unit roundoff).
    Returns ({name: (ms, CUDA peak MiB)}, the number that did not)."""
    rows, ref, failures = {}, None, 0
    inputs64 = tuple(t.detach().double().requires_grad_(True) for t in inputs)
    for name, fn in fns.items():
        ms, peak, res = run_case(fn, inputs, grad_out, autocast, device, iters)
        res64 = fwd_bwd(fn, inputs64, grad_out.double(), contextlib.nullcontext)  # not timed
        if ref is None:
            ref, ref64 = res, res64
        elif not all(close(*pair, unit) for pair in zip(res, res64, ref, ref64)):
            print(f"  MISMATCH: {name} differs from vmap on {what}")
            failures += 1
        rows[name] = (ms, peak)
    return rows, failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[40, 80])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--variants", nargs="+", choices=CONV_WAYS, default=list(CONV_WAYS))
    args = p.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; medians of {args.iters} runs"
          + ("; each variant replayed as a CUDA graph" if device.type == "cuda" else ""))
    variants = ["vmap"] + [v for v in args.variants if v != "vmap"]
    failures = 0
    for precision in args.precision:
        def autocast(precision=precision):
            return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)
        unit = U32 if precision == "fp32" else U_BF16
        for n in args.clients:
            print(f"\n{precision}, {n} clients: forward + backward, ms (TFLOP/s; CUDA peak MiB)")
            print(f"  {'layer':28s}" + "".join(f"{v:>26s}" for v in variants) + "   fastest")
            totals = dict.fromkeys(variants, 0.0)
            for layer in cgan28_layers():
                def rand(*shape):
                    return torch.randn(*shape, generator=gen).to(device)
                x = rand(n, args.batch, layer.cin, layer.size, layer.size).requires_grad_(True)
                w = (rand(n, *layer.weight_shape()) * 0.02).requires_grad_(True)
                b = rand(n, layer.cout).requires_grad_(True)
                grad_out = rand(n, args.batch, layer.cout, layer.out_size, layer.out_size)
                conv = _conv_module(layer).to(device)
                fns = {v: (lambda x, w, b, how=v, conv=conv: client_conv(conv, w, b, x, how)) for v in variants}
                row, bad = time_variants(fns, (x, w, b), grad_out, autocast, device, args.iters, unit,
                                         f"{layer.name} ({precision}, {n} clients)")
                failures += bad
                for v, (ms, _) in row.items():
                    totals[v] += ms
                flops = layer.flops(n, args.batch)
                cells = "".join(f"{ms:9.3f} ({flops / ms / 1e9:6.1f}" + (f"; {peak:6.0f})" if peak else ")        ")
                                for ms, peak in row.values())
                best = min(row, key=lambda v: row[v][0])
                print(f"  {layer.name:28s}{cells}   {best} {row['vmap'][0] / row[best][0]:.2f}x")
            print(f"  {'sum':28s}" + "".join(f"{totals[v]:9.3f}{'':17s}" for v in variants))
            # BatchNorm of the largest activations: the generator's 128 x 14 x 14
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # as a convolution leaves it
            x = torch.randn(n, args.batch, 128, 14, 14, generator=gen).to(device, dtype).requires_grad_(True)
            g = (1 + 0.02 * torch.randn(n, 128, generator=gen)).to(device).requires_grad_(True)
            bb = torch.zeros(n, 128, device=device).requires_grad_(True)
            grad_out = torch.randn(n, args.batch, 128, 14, 14, generator=gen).to(device)
            row, bad = time_variants(BNS, (x, g, bb), grad_out, autocast, device, args.iters, unit,
                                     f"BatchNorm ({precision}, {n} clients)")
            failures += bad
            cells = [f"{v} {ms:.3f}" for v, (ms, _) in row.items()]
            print("  BatchNorm 128x14x14 per client: " + ", ".join(cells) + " ms")
    if failures:
        print(f"\n{failures} variant(s) disagree with vmap", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
