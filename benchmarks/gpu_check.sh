#!/usr/bin/env bash
# The GPU check of docs/performance.md, for a lent GPU machine. From the repository root:
#
#   HUSCF_DATA=/path/to/mnist-family bash benchmarks/gpu_check.sh [OUT_DIR [STEP...]]
#
# Steps, in this order unless named (a session with 15 device minutes runs the first five in one
# call of about 7 minutes, then the rest if time is left):
#   cuda_tests    the CUDA tests: CUDA graphs replay the eager iteration (fp32, bf16, folded BatchNorm,
#                 clients over per-cluster server bodies)
#   blocks        bench_blocks.py: the clients' own convolutions and BatchNorm as vmap, bmm or a loop
#   s6_bf16       scenario 6 (four domains, IID, 80 clients, width 1, batch 64) at full scale in bf16
#                 with the CUDA defaults: seconds per iteration, the round end, the projected 50 rounds
#   s6_bf16_fold  the same with compute.fold_batch_norm
#   s6_bf16_loop  the same with compute.fold_batch_norm and compute.client_convs=loop
#   bench_train   bench_train.py at 20 and 80 clients: the loop, the defaults in fp32 and bf16, and
#                 bf16 with the BatchNorm and convolution options
#   s6_fp32       scenario 6 in fp32 with the CUDA defaults
#   paper_plan    bench_quality.py --paper --dry-run: the projected wall time of the paper-scale
#                 quality grid (issue 16) on this GPU, from 5 iterations of HuSCF-GAN
# Each step has its own time limit and a failing step does not stop the later ones.
# Needs torch with CUDA, and huscf's dependencies importable (pip install -e . or PYTHONPATH=.);
# benchmarks/gpu_bundle.sh prepares both for a machine without network.
set -uo pipefail
: "${HUSCF_DATA:?set HUSCF_DATA to a folder holding mnist, fashion_mnist, kmnist and notmnist}"
OUT=${1:-$(mktemp -d)}
shift || true
STEPS=${*:-cuda_tests blocks s6_bf16 s6_bf16_fold s6_bf16_loop bench_train s6_fp32 paper_plan}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
S6="benchmarks/bench_scenario.py configs/6_multi_domain_iid.yaml --set compute.device=cuda"
BF16="--set compute.precision=bf16"
FOLD="--set compute.fold_batch_norm=true"
step() {  # step NAME LIMIT_S COMMAND...: run, tee to OUT/NAME.txt, report the exit status
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
for s in $STEPS; do
    case $s in
        cuda_tests) step "$s" 120 python3 -m pytest -q -p no:cacheprovider tests/test_execution.py -k cuda_graph ;;
        blocks) step "$s" 120 python3 benchmarks/bench_blocks.py --device cuda --clients 40 80 --iters 10 ;;
        s6_bf16) step "$s" 150 python3 $S6 $BF16 --out /tmp/s6b ;;
        s6_bf16_fold) step "$s" 150 python3 $S6 $BF16 $FOLD --out /tmp/s6f ;;
        s6_bf16_loop) step "$s" 150 python3 $S6 $BF16 $FOLD --set compute.client_convs=loop --out /tmp/s6l ;;
        bench_train) step "$s" 270 python3 benchmarks/bench_train.py --device cuda --clients 20 80 --iters 3 \
            --modes loop ours-fp32 ours-bf16 ours-bf16+fold_batch_norm=true \
            ours-bf16+fold_batch_norm=true+client_convs=loop ours-bf16+fold_batch_norm=true+client_convs=bmm ;;
        s6_fp32) step "$s" 150 python3 $S6 --out /tmp/s6 ;;
        paper_plan) step "$s" 180 python3 benchmarks/bench_quality.py --paper --dry-run --set compute.device=cuda ;;
        *) echo "gpu_check: unknown step $s" >&2; exit 2 ;;
    esac
done
