#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a lent GPU machine that cannot fetch anything:
#
#   bash benchmarks/gpu_bundle.sh [DATA_DIR] [PYTHON_VERSION]
#
# writes .gpu/ in the repository root (add ".gpu/" to .git/info/exclude so it stays untracked):
# - .gpu/whl: wheels of huscf's dependencies that the machine's image lacks (pydantic and its
#   own dependencies), for its Python (default 3.12) on manylinux x86_64;
# - .gpu/data: a copy of the four MNIST-family domains scenario 6 trains on.
# Then run the check there (docs/performance.md, "Running the GPU check"):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD HUSCF_DATA=$PWD/.gpu/data bash benchmarks/gpu_check.sh $OUT
set -euo pipefail
DATA=${1:-${HUSCF_DATA:-../shared/data}}
PY=${2:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p .gpu/whl .gpu/data
# the versions installed here, so both machines run the same validation code
pins=$(python3 - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in
               ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
EOF
)
# shellcheck disable=SC2086
python3 -m pip download -q --only-binary=:all: --no-deps --python-version "$PY" \
    --platform manylinux2014_x86_64 -d .gpu/whl $pins
for d in mnist fashion_mnist kmnist notmnist; do
    [ -d "$DATA/$d" ] || { echo "gpu_bundle: $DATA/$d not found (give the MNIST-family folder)" >&2; exit 2; }
    rm -rf ".gpu/data/$d" && cp -r "$DATA/$d" .gpu/data/
done
du -sh .gpu
