#!/usr/bin/env bash
# The checks only a GPU machine can run: tests/test_gpu.py (DALI device="mixed" with NVDEC, H.264 shards,
# models on CUDA), then the data, model and training benchmarks (bench.py) on the GPU paths. Results under $OUT.
# Needs the project's venv (`make venv`, or PY=... for another interpreter with requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
unset DS_ACCELERATOR  # DeepSpeed picks CUDA by itself
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

"$PY" -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no GPU: every test above was skipped')"

for recipe in svt lstcl; do
    "$PY" bench.py data --recipe "$recipe" --device mixed --threads 4 --out "$OUT/data_${recipe}_mixed.json"
    "$PY" bench.py data --op-costs --recipe "$recipe" --device mixed --threads 4 --out "$OUT/ops_${recipe}_mixed.json"
done
"$PY" bench.py model --config configs/svt_vitb16.yaml --sizes tiny,small,base --batch 8 --device cuda --dtype bfloat16 --out "$OUT/model_cuda.json"
"$PY" bench.py e2e --config configs/svt_vitb16.yaml --shards runs/bench/data_shards --steps 10 --warmup 3 \
    --out "$OUT/e2e_svt_vitb16.json" trainer.batch_size_per_gpu=8 model.pretrained=none  # speed needs no weights
echo "wrote $OUT"
