"""How much rounding the tests' numerical comparisons see, against the tolerances they allow.

Run:  python benchmarks/bench_tolerances.py [--iterations 3]
      ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 python benchmarks/bench_tolerances.py   # other kernels

For the comparisons the suite makes between two computations that differ only in summation order
(the batched engine against the per-client loop with clients spread over cluster bodies; a split
network's gradients against the unsplit network's), it prints per comparison:

* ``fp32 gap``: max |A - B| when both run in float32 (what a hand-picked fp32 tolerance had to
  cover: 1.22e-5 on an Intel Xeon against 1e-5 allowed, issue 33);
* ``fp32 err``: max |B32 - B64|, the rounding error of the fp32 run itself, and ``amplification``
  = fp32 err / (U32 x size of the values): how much the computation grows unit roundoff
  (tests/numerics.py's AMPLIFICATION must stay above it);
* ``fp64 gap``: max |A - B| in float64, and ``margin`` = the float64 tolerance TOL64 x size over
  it: how far below the tolerance the float64 comparison sits (>= 1e3 leaves any CPU room);
* ``bug``: max |A - B| in float64 when the batched engine runs client 0 through another cluster
  body (an injected bug), in multiples of the tolerance: how far above it a real error lands.

Prints the kernels torch chose (``torch.backends.cpu.get_cpu_capability()``) and the kernel
variables that are set, so that runs under other kernels can be compared.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the tolerance policy's constants (tests/numerics.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numerics import AMPLIFICATION, TOL64, U32, gap  # noqa: E402

from huscf.config import TrainConfig  # noqa: E402
from huscf.engines.batched import BatchedEngine  # noqa: E402
from huscf.engines.execution import Execution  # noqa: E402
from huscf.engines.precision import cpu_kernels  # noqa: E402
from huscf.engines.simulation import SimulationEngine  # noqa: E402
from huscf.models import build_architecture  # noqa: E402
from huscf.runsetup import ClientData  # noqa: E402
from huscf.split.plan import all_cuts  # noqa: E402
from huscf.split.segments import SplitGAN  # noqa: E402


def _model(noise: float = 0.02) -> SplitGAN:
    """6 clients with heterogeneous cuts over the shared body and three cluster bodies (as the tests)."""
    torch.manual_seed(0)
    arch = build_architecture("cgan28", width=0.25)
    g, d = arch.generator(), arch.discriminator()
    cuts = random.Random(1).sample(all_cuts(g.num_middle, d.num_middle), 6)
    split = SplitGAN(g, d, cuts, cluster_bodies=3)
    with torch.no_grad():
        for body in split.cluster_bodies:
            for p in body.parameters():
                p.add_(torch.randn_like(p) * noise)
    split.body_of.copy_(torch.tensor([0, 2, -1, 0, 2, 1]))
    return split


def engine_outputs(batched: bool, precision: str, iterations: int, swap_body: bool = False) -> np.ndarray:
    """The losses of ``iterations`` iterations and every client's G and D outputs afterwards."""
    gen = torch.Generator().manual_seed(0)
    data = [ClientData(torch.rand(16, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(0, 10, (16,), generator=gen),
                       "x") for _ in range(6)]
    ex = Execution(batch_clients=batched, precision=precision)
    cls = BatchedEngine if batched else SimulationEngine
    eng = cls(copy.deepcopy(_model()), data, train=TrainConfig(batch_size=8), z_dim=100, seed=0, execution=ex,
              feature_depth=2)
    if swap_body:  # the injected bug: client 0 runs through body 1 instead of its own (body 0)
        eng._slots = [1] + eng._slots[1:]
        eng._plans.clear()
    noise, out = torch.Generator().manual_seed(0), []
    for t in range(iterations):
        batch = {i: (d.x[:8], d.y[:8]) for i, d in enumerate(eng.data) if not (t == 1 and i == 2)}
        out += [v for _, pair in sorted(eng.iteration(batch, noise).items()) for v in pair]
    z, y = torch.randn(8, 100, generator=torch.Generator().manual_seed(5)).to(ex.dtype), torch.arange(8) % 10
    with torch.no_grad():
        for i in range(6):
            fake = eng.model.generate(i, z, y)
            out += fake.flatten().tolist() + eng.model.discriminate(i, fake, y).flatten().tolist()
    return np.asarray(out, dtype=np.float64)


def split_gradients(split: bool, precision: str) -> np.ndarray:
    """Every client's D-of-G output and the gradients of all its blocks, split or assembled."""
    model = _model()
    if precision == "fp64":
        model.double()
    z = torch.randn(6, 100, generator=torch.Generator().manual_seed(2)).to(next(model.parameters()).dtype)
    y = torch.arange(6) % 10
    out = []
    for i in range(6):
        model.zero_grad()
        if split:
            o = model.discriminate(i, model.generate(i, z, y), y)
            params = [p for net in ("G", "D") for b in range(model.num_blocks[net])
                      for p in (model.clients[i].nets[net][str(b)] if model.clients[i].holds(net, b)
                                else model.body(i).nets[net][str(b)]).parameters()]
        else:
            g, d = model.assemble(i, "G"), model.assemble(i, "D")
            o = d(g(z, y), y)
            params = [*g.parameters(), *d.parameters()]
        o.square().sum().backward()
        out += o.flatten().tolist() + [v for p in params for v in p.grad.flatten().tolist()]
    return np.asarray(out, dtype=np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=3, help="training iterations of the engine comparison")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {cpu_kernels()}; AMPLIFICATION {AMPLIFICATION:.0e}, TOL64 {TOL64:.2e}")
    rows = []
    for name, run in (("batched engine vs loop (losses, outputs)",
                       lambda a, prec, **kw: engine_outputs(a, prec, args.iterations, **kw)),
                      ("split vs unsplit (outputs, gradients)", lambda a, prec, **kw: split_gradients(a, prec))):
        a32, b32, a64, b64 = run(True, "fp32"), run(False, "fp32"), run(True, "fp64"), run(False, "fp64")
        size = max(1.0, float(np.abs(b64).max()))
        err32 = gap(b32, b64)
        row = {"comparison": name, "fp32 gap": gap(a32, b32), "fp32 err": err32, "amplification": err32 / (U32 * size),
               "fp64 gap": gap(a64, b64), "margin": TOL64 * size / max(gap(a64, b64), 1e-300)}  # 'exact' at 0
        if name.startswith("batched"):
            row["bug"] = gap(run(True, "fp64", swap_body=True), b64) / (TOL64 * size)
        rows.append(row)
    heads = ("fp32 gap", "fp32 err", "amplif.", "fp64 gap", "margin", "bug/tol")
    print(f"{'comparison':42} " + " ".join(f"{h:>9}" if i != 2 else f"{h:>8}" for i, h in enumerate(heads)))
    for r in rows:
        print(f"{r['comparison']:42} {r['fp32 gap']:9.2e} {r['fp32 err']:9.2e} {r['amplification']:8.0f} "
              f"{r['fp64 gap']:9.2e} " + (f"{r['margin']:9.1e} " if r["fp64 gap"] else f"{'exact':>9} ")
              + (f"{r['bug']:9.1e}" if "bug" in r else f"{'-':>9}"))
    worst = max(r["amplification"] for r in rows)
    print(f"\nlargest amplification {worst:.0f} (AMPLIFICATION allows {AMPLIFICATION:.0f}: "
          f"{'ok' if worst <= AMPLIFICATION else 'RAISE IT'}); smallest float64 margin "
          f"{min((r['margin'] for r in rows if r['fp64 gap']), default=float('inf')):.1e}")


if __name__ == "__main__":
    main()
