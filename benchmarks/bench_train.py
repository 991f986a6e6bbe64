"""Speed and memory of one training iteration at the paper's scale, against the hardware and a loop.

Run:  python benchmarks/bench_train.py [--device cpu|cuda] [--clients 8 20 80] [--iters 2]
                                        [--modes loop ours-fp32 ours-bf16] [--score-check] [--profile]

For each client count N (paper cGAN at width 1, batch 64, MILP cuts on the paper's device
profiles, random images: speed does not depend on the pixels) and each mode, a fresh subprocess
builds the split model and times ``--iters`` iterations after one warm-up, so every mode's peak
memory is its own. Modes:

* ``loop``      - the baseline: the plain per-client Python loop, fp32, NCHW, every client's
                  generator graph kept through the discriminator step;
* ``ours-fp32`` - huscf's default execution for the device (``Execution.resolve``: channels-last,
                  generator recompute past 16 clients on CPU, clients batched and replayed as CUDA
                  graphs on CUDA);
* ``ours-bf16`` - the same with bf16 autocast (``compute.precision: bf16``);
* ``batched-fp32`` / ``batched-bf16`` - clients batched through vmap, launched eagerly (no CUDA graphs),
                  on any device;
* ``MODE+key=value...`` - any of the above but ``loop``, with compute options overridden, e.g.
                  ``ours-bf16+clients=batched+fold_batch_norm=true+client_convs=loop`` (keys: the
                  ``compute`` section's clients, channels_last, recompute_generator, client_chunk,
                  cuda_graphs, fold_batch_norm, client_convs).

Printed: seconds per iteration, images/s, the ratio to ``loop``, FLOP/s achieved (the useful
FLOPs of one iteration, counted by ``torch.utils.flop_counter`` on the baseline step; recompute
is not counted as useful) against the dense-matmul FLOP/s measured in this process in the same
precision, and peak memory (RSS on CPU; on CUDA also the allocator's peak).

``--score-check`` also trains the offline default run for a few rounds in fp32 and in bf16 and
compares the generation score of their generators (domain classifier, 2000 samples), for each of
``--score-seeds``; ``--clients`` with no counts runs the score check alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from provenance import made_line  # noqa: E402

from huscf.engines.precision import bf16_support, choose_precision, cpu_kernels  # noqa: E402

MODES = {
    "loop": dict(precision="fp32", auto=False),
    "ours-fp32": dict(precision="fp32", auto=True),
    "ours-bf16": dict(precision="bf16", auto=True),
    "batched-fp32": dict(precision="fp32", auto=True, clients="batched", cuda_graphs=False),
    "batched-bf16": dict(precision="bf16", auto=True, clients="batched", cuda_graphs=False),
}
# compute options a mode may override: MODE+key=value[+key=value...], e.g. ours-bf16+client_convs=loop
OVERRIDABLE = ("clients", "channels_last", "recompute_generator", "client_chunk", "cuda_graphs", "fold_batch_norm",
               "client_convs")


def mode_spec(mode: str) -> dict:
    """A mode's settings: one of MODES, then any ``+key=value`` compute overrides (YAML values)."""
    import yaml

    base, *sets = mode.split("+")
    if base not in MODES:
        raise SystemExit(f"bench_train: unknown mode {base!r} (one of {', '.join(MODES)}, then +key=value)")
    if sets and not MODES[base]["auto"]:
        raise SystemExit("bench_train: 'loop' is the fixed baseline and takes no overrides")
    spec = dict(MODES[base])
    for item in sets:
        key, eq, value = item.partition("=")
        if key not in OVERRIDABLE or not eq:
            raise SystemExit(f"bench_train: {item!r} in mode {mode!r}: give key=value, "
                             f"key one of {', '.join(OVERRIDABLE)}")
        spec[key] = yaml.safe_load(value)
    return spec


def build(n: int, device: str, mode: str, width: float, batch: int):
    from huscf.config import TrainConfig
    from huscf.cuts import assign_devices, load_profiles, plan_cuts
    from huscf.engines.batched import BatchedEngine
    from huscf.engines.execution import Execution
    from huscf.engines.simulation import SimulationEngine
    from huscf.models import build_architecture
    from huscf.runsetup import ClientData
    from huscf.split.segments import SplitGAN

    spec = mode_spec(mode)
    if spec["auto"]:
        ex = Execution.resolve(device=device, precision=spec["precision"], num_clients=n,
                               **{k: spec[k] for k in OVERRIDABLE if k in spec})
    else:
        ex = Execution(device=device)
    arch = build_architecture("cgan28", width)
    server, devices = load_profiles("paper")
    plan = plan_cuts(arch, batch, assign_devices(devices, n, "round_robin", 0), server, method="milp")
    torch.manual_seed(0)
    model = SplitGAN(arch.generator(), arch.discriminator(), list(plan.cuts))
    gen = torch.Generator().manual_seed(0)
    data = [ClientData(torch.rand(batch, 1, 28, 28, generator=gen) * 2 - 1,
                       torch.randint(0, 10, (batch,), generator=gen), "bench") for _ in range(n)]
    cls = BatchedEngine if ex.batch_clients else SimulationEngine
    engine = cls(model, data, train=TrainConfig(batch_size=batch), z_dim=arch.z_dim, seed=0, execution=ex)
    return engine, ex


def worker(args) -> None:
    from huscf.engines.batched import _GRAPH_WARMUP

    engine, ex = build(args.worker_clients, args.device, args.worker_mode, args.width, args.batch)
    batch = {i: (d.x, d.y) for i, d in enumerate(engine.data)}
    noise = torch.Generator().manual_seed(0)
    cuda = ex.torch_device.type == "cuda"
    times = []
    # graphs: the eager warm-ups and the capture come before the timed replays
    warm = 1 if not ex.cuda_graphs else _GRAPH_WARMUP + 1
    for _ in range(warm + args.iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.iteration(batch, noise)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[warm:])
    if args.profile:  # one more iteration under the profiler: where the time goes, by operator
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            engine.iteration(batch, noise)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr, flush=True)
    out = {
        "seconds": timed[len(timed) // 2], "warmup_seconds": sum(times[:warm]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "execution": {k: getattr(ex, k) for k in ("precision", "channels_last", "recompute_generator",
                                                  "batch_clients", "client_chunk", "fold_batch_norm", "client_convs")},
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(args, n: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--device", args.device, "--width", str(args.width), "--batch",
           str(args.batch), "--iters", str(args.iters), "--worker-clients", str(n), "--worker-mode", mode]
    if args.profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if args.profile:
        print(f"-- profile, {n} clients, {mode}\n{proc.stderr[-6000:]}", file=sys.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"bench_train: worker N={n} {mode} failed:\n{proc.stderr[-2000:]}")


def matmul_flops(device: str, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s of this process (the ceiling the step is compared with)."""
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    reps = 20 if device == "cuda" else 5
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def useful_flops_per_client(width: float, batch: int) -> float:
    """FLOPs of one client's share of the baseline iteration, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    engine, _ = build(1, "cpu", "loop", width, batch)
    batch_ = {0: (engine.data[0].x, engine.data[0].y)}
    with FlopCounterMode(display=False) as counter:
        engine.iteration(batch_, torch.Generator().manual_seed(0))
    return float(counter.get_total_flops())


def score_check(rounds: int, seeds: list[int]) -> None:
    """Generation score of the offline default run after ``rounds`` rounds, fp32 vs bf16, per seed."""
    import tempfile

    from huscf.config import build_config
    from huscf.rundir import RunDir
    from huscf.trainer import Trainer

    print(f"\nscore check: offline default run (digits + digits_inverted, 8 clients, width 0.25), {rounds} rounds, "
          "generation score on 2000 samples per cluster generator")
    ratios = []
    for seed in seeds:
        scores = {}
        for precision in ("fp32", "bf16"):
            cfg = build_config({}, [f"train.rounds={rounds}", f"output.eval_every={rounds}", "output.eval_samples=2000",
                                    f"compute.precision={precision}", "compute.device=cpu", "output.samples_every=0",
                                    f"seed={seed}"])
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                Trainer.new(cfg, Path(tmp) / "run", quiet=True).fit()
                row = RunDir(Path(tmp) / "run").read_rounds()[-1]
                scores[precision] = (row.generation_score, time.perf_counter() - start)
        for domain in scores["fp32"][0]:
            a, b = scores["fp32"][0][domain], scores["bf16"][0][domain]
            ratios.append(b / a)
            print(f"  seed {seed} {domain:16s} fp32 {a:.3f}  bf16 {b:.3f}  bf16/fp32 {b / a:.3f}  "
                  f"({abs(b / a - 1) * 100:.1f}% apart)")
        print(f"  seed {seed} wall time: fp32 {scores['fp32'][1]:.0f} s, bf16 {scores['bf16'][1]:.0f} s")
    worst = max(abs(r - 1) for r in ratios)
    print(f"  bf16/fp32 over {len(ratios)} generators: mean {sum(ratios) / len(ratios):.3f}, "
          f"furthest {worst * 100:.1f}% apart (target: within 5%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--clients", type=int, nargs="*", default=[8, 20, 80],
                   help="client counts to time (none: only the score check)")
    p.add_argument("--modes", nargs="+", default=None, metavar="MODE[+key=value...]",
                   help=f"of {', '.join(MODES)}; default: loop ours-fp32 ours-bf16 (+ batched-fp32 on CUDA)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up (median reported)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="print each worker's top operators to stderr")
    p.add_argument("--score-check", type=int, nargs="?", const=8, default=0, metavar="ROUNDS")
    p.add_argument("--score-seeds", type=int, nargs="+", default=[0], help="seeds of the score check")
    p.add_argument("--worker-clients", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_clients:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda but torch sees no CUDA device")
    modes = args.modes or (["loop", "ours-fp32", "ours-bf16"] if args.device == "cpu"
                           else ["loop", "ours-fp32", "ours-bf16", "batched-fp32"])
    for mode in modes:  # a typo fails now, not after the first client count's runs
        mode_spec(mode)
    print(made_line(), flush=True)
    if not args.clients:
        if args.score_check:
            score_check(args.score_check, args.score_seeds)
        return
    width = max(13, *(len(m) for m in modes))
    name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    # the ceilings of the precisions the modes use: emulated bf16 (a CPU without native bf16, or
    # oneDNN held below it) runs a 2048^2 matmul at under 1 GFLOP/s, minutes for nothing
    used = {mode_spec(m)["precision"] for m in modes}
    ceiling = {p: matmul_flops(args.device, dtype) if p in used else float("nan")
               for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    per_client = useful_flops_per_client(args.width, args.batch)
    print(f"machine: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_kernels()}")
    print("dense matmul: " + ", ".join(f"{p} {c / 1e9:.0f} GFLOP/s" for p, c in ceiling.items() if p in used) + "; "
          f"{bf16_support(args.device).reason} (compute.precision: auto picks "
          f"{choose_precision('auto', args.device)[0]})")
    print(f"model: cgan28 width {args.width}, batch {args.batch}; useful work {per_client / 1e9:.2f} GFLOP per client "
          f"per iteration\n")
    head = f"{'clients':>7} {'mode':{width}} {'s/iter':>8} {'img/s':>8} {'vs loop':>8} {'GFLOP/s':>8} {'of peak':>8} {'peak RSS':>9}"
    print(head + ("  CUDA peak" if args.device == "cuda" else ""))
    for n in args.clients:
        base = None
        for mode in modes:
            r = run_worker(args, n, mode)
            secs = r["seconds"]
            base = secs if mode == "loop" else base
            precision = mode_spec(mode)["precision"]
            achieved = per_client * n / secs
            ratio = f"{base / secs:7.2f}x" if base else f"{'-':>8}"
            line = (f"{n:>7} {mode:{width}} {secs:8.3f} {n * args.batch / secs:8.0f} {ratio} {achieved / 1e9:8.1f} "
                    f"{achieved / ceiling[precision] * 100:7.0f}% {r['peak_rss_gib']:7.2f}GiB")
            if r["peak_cuda_gib"] is not None:
                line += f"  {r['peak_cuda_gib']:7.2f}GiB"
            print(line, flush=True)
    print("\n'of peak' = achieved useful FLOP/s / dense matmul FLOP/s in the mode's precision; "
          "'vs loop' = loop seconds / mode seconds at the same client count")
    if args.score_check:
        score_check(args.score_check, args.score_seeds)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
