#!/usr/bin/env bash
# The GPU check of docs/performance.md, for a lent GPU machine. From the repository root:
#
#   HUSCF_DATA=/path/to/mnist-family bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. the CUDA tests (CUDA graphs replay the eager iteration, fp32 and bf16), then bench_blocks.py:
#    the clients' own convolutions and BatchNorm as vmap (the engine's way), bmm or a loop;
# 2. scenario 6 (four domains, IID, 80 clients, width 1, batch 64) at full scale with the CUDA
#    defaults (batched clients, CUDA graphs) in fp32, then in bf16: seconds per iteration, the
#    round end and the projected 50 rounds;
# 3. bench_train.py on CUDA at 8, 20 and 80 clients: the loop, the defaults in fp32 and bf16, the
#    same with compute.fold_batch_norm, and batched clients launched eagerly (no CUDA graphs);
# 4. scenario 6 in bf16 with compute.fold_batch_norm, against step 2's.
# Each step has its own time limit and a failing step does not stop the later ones.
# Needs torch with CUDA, and huscf's dependencies importable (pip install -e . or PYTHONPATH=.).
set -uo pipefail
: "${HUSCF_DATA:?set HUSCF_DATA to a folder holding mnist, fashion_mnist, kmnist and notmnist}"
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
S6=configs/6_multi_domain_iid.yaml
step() {  # step NAME LIMIT_S COMMAND...: run, tee to OUT/NAME.txt, report the exit status
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_execution.py -k cuda_graphs
step blocks 120 python3 benchmarks/bench_blocks.py --device cuda --clients 40 80
step scenario6_fp32 150 python3 benchmarks/bench_scenario.py $S6 --set compute.device=cuda --out /tmp/s6
step scenario6_bf16 150 python3 benchmarks/bench_scenario.py $S6 --set compute.device=cuda \
    --set compute.precision=bf16 --out /tmp/s6b
step bench_train 270 python3 benchmarks/bench_train.py --device cuda --clients 8 20 80 --iters 3 \
    --modes loop ours-fp32 ours-bf16 ours-fp32-bnfold ours-bf16-bnfold batched-fp32
step scenario6_bf16_bnfold 150 python3 benchmarks/bench_scenario.py $S6 --set compute.device=cuda \
    --set compute.precision=bf16 --set compute.fold_batch_norm=true --out /tmp/s6f
