#!/usr/bin/env bash
# The GPU check of docs/performance.md, for a lent GPU machine. From the repository root:
#
#   HUSCF_DATA=/path/to/mnist-family bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. scenario 6 (four domains, IID, 80 clients, width 1, batch 64) at full scale in bf16: one real
#    local epoch timed, and the projected wall time of the configured 50 rounds x 5 epochs;
# 2. bench_train.py on CUDA: loop vs batched clients, fp32 and bf16, at 8, 20 and 80 clients;
# 3. scenario 6 again in fp32.
# Needs torch with CUDA, and huscf's dependencies importable (pip install -e . or PYTHONPATH=.).
set -euo pipefail
: "${HUSCF_DATA:?set HUSCF_DATA to a folder holding mnist, fashion_mnist, kmnist and notmnist}"
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== scenario 6, full scale, bf16"
python3 benchmarks/bench_scenario.py configs/6_multi_domain_iid.yaml --set compute.device=cuda \
    --set compute.precision=bf16 --out "$OUT/scenario6_bf16" 2>&1 | tee "$OUT/scenario6_bf16.txt"

echo "== bench_train (CUDA)"
python3 benchmarks/bench_train.py --device cuda --clients 8 20 80 --iters 3 \
    --modes loop ours-fp32 ours-bf16 2>&1 | tee "$OUT/bench_train_cuda.txt"

echo "== scenario 6, full scale, fp32"
python3 benchmarks/bench_scenario.py configs/6_multi_domain_iid.yaml --set compute.device=cuda \
    --set compute.precision=fp32 --out "$OUT/scenario6_fp32" 2>&1 | tee "$OUT/scenario6_fp32.txt"
