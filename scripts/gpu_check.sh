#!/usr/bin/env bash
# Every check only a GPU machine can run, each one reported even when another fails:
#   env       GPU, driver, torch / CUDA / DALI versions; fails when torch sees no GPU
#   tests     tests/test_gpu.py (DALI device="mixed" with NVDEC, torch on CUDA, and their CPU twins)
#   footage   synthetic videos written with PyAV (no download)
#   shards    the footage sharded by `python -m shard_tools`, as a real job would (or --shards DIR)
#   data_*    bench.py data --device mixed: DALI views graph vs baseline vs decode-only, SVT and LSTCL
#             (SVT at data.repeats 1, 2, 4 side by side: CPU and wall per view-set)
#   ops_*     bench.py data --op-costs --device mixed: decode and each graph step
#   model     bench.py model --device cuda --dtype bfloat16: TimeSformer tiny / small / base, SVT views
#   e2e       bench.py e2e (configs/svt_vitb16.yaml): steps/s, data wait, MFU, collectives + host syncs
#
#   bash scripts/gpu_check.sh                  # on a GPU node: everything -> runs/gpu/, then runs/gpu.tar.gz
#   bash scripts/gpu_check.sh --shards DIR     # benchmark an existing shard folder (skips footage + sharding)
#   bash scripts/gpu_check.sh --parts env,tests,model
#   bash scripts/gpu_check.sh --dry-run        # CPU, tiny sizes: the script's own CI test (tests/test_gpu_check.py)
#
# Works offline. Needs the project's venv (`make venv`, or PY=... for another interpreter with
# requirements.txt). Each part runs under `timeout` (PART_TIMEOUT seconds, default 3600) with its output
# in OUT/<part>.log; OUT/summary.txt lists every part, its status and time. Exit status 1 when a part failed.
# What to send back from a GPU run: OUT.tar.gz (see docs/benchmarks.md#gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu}
PART_TIMEOUT=${PART_TIMEOUT:-3600}
DRY=0
SHARDS=""
PARTS=""
ALL_PARTS="env tests footage shards data_svt data_lstcl ops_svt ops_lstcl model e2e"

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --shards) SHARDS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --parts) PARTS=$(echo "$2" | tr ',' ' '); shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
PARTS=${PARTS:-$ALL_PARTS}
for part in $PARTS; do
    case " $ALL_PARTS " in *" $part "*) ;; *) echo "gpu_check.sh: unknown part $part (parts: $ALL_PARTS)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"
: > "$OUT/commands.txt"

if [ "$DRY" = 1 ]; then
    # the same commands at tiny sizes on the CPU: keeps the script itself from rotting (CI)
    export DS_ACCELERATOR=cpu
    DEVICE=cpu TORCH_DEVICE=cpu
    TESTS=(-k "cpu and (h264 or kinds or guard)")
    FOOTAGE=(4 16 160 128)            # videos, frames, width, height (NVDEC's VP9 minimum is 128x128)
    DATA=(--batch-size 2 --warmup 1 --batches 1 --rounds 1 --threads 1 --modes dali)
    REPEATS=(--repeats 1 2)
    OPS=(--batch-size 2 --threads 1)
    MODEL=(--sizes tiny --batch 1 --depth 1 --warmup 1 --repeats 1 --device cpu --dtype float32
           data.svt.global_size=32 data.svt.local_size=16 model.out_dim=64 model.hidden_dim=32 model.bottleneck_dim=16)
    E2E=(--config configs/demo_cpu.yaml --steps 1 --warmup 1 --loaders dali --
         "model.backbone_kwargs={depth: 1, img_size: 32, num_frames: 4}" model.backbone=timesformer_tiny_patch16
         "data.svt.global_frames=[4, 2]" data.svt.global_size=32 "data.svt.local_frames=[2, 2]" data.svt.local_size=16
         model.out_dim=64 model.hidden_dim=32 model.bottleneck_dim=16 trainer.batch_size_per_gpu=2
         data.num_threads=1 trainer.torch_threads=1)
else
    unset DS_ACCELERATOR  # DeepSpeed picks CUDA by itself
    DEVICE=mixed TORCH_DEVICE=cuda
    TESTS=()
    FOOTAGE=(128 120 340 256)         # Kinetics-like: short side 256, ~5 s at 25 fps
    DATA=(--threads 4)
    REPEATS=(--repeats 1 2 4)
    OPS=(--threads 4)
    MODEL=(--config configs/svt_vitb16.yaml --sizes tiny,small,base --batch 8 --device cuda --dtype bfloat16)
    E2E=(--config configs/svt_vitb16.yaml --steps 10 --warmup 3 trainer.batch_size_per_gpu=8
         model.pretrained=none)  # speed needs no pretrained weights
fi
SHARDS=${SHARDS:-$OUT/shards}

selected() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

FAILED=0
run_part() {  # run_part NAME COMMAND...: runs it under a timeout, logs it, records the outcome
    local name=$1; shift
    selected "$name" || return 0
    echo "== $name" | tee -a "$OUT/commands.txt"
    printf '%q ' "$@" >> "$OUT/commands.txt"; echo >> "$OUT/commands.txt"
    local start=$SECONDS
    timeout "$PART_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status=ok
    if [ $rc -eq 124 ]; then status="timeout after ${PART_TIMEOUT}s"; elif [ $rc -ne 0 ]; then status="failed (exit $rc)"; fi
    [ "$status" = ok ] || FAILED=1
    printf '%-12s %-24s %6ss  %s\n' "$name" "$status" "$((SECONDS - start))" "$OUT/$name.log" | tee -a "$OUT/summary.txt"
    [ "$status" = ok ] || tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
}

ENV_PY='
import shutil, subprocess, sys
import torch
import nvidia.dali as dali
import deepspeed
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"])
else:
    print("nvidia-smi: not found")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), DALI {dali.__version__}, DeepSpeed {deepspeed.__version__}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
elif sys.argv[1] == "1":
    print("no GPU (dry run: CPU only)")
else:
    sys.exit("torch sees no GPU: the GPU parts run on nothing")
'
# synthetic footage in two class folders (moving bars, lengths varied so frame plans differ)
FOOTAGE_PY='
import sys
from pathlib import Path
from footage import write_synthetic_video
folder, count, frames, width, height = Path(sys.argv[1]), *map(int, sys.argv[2:])
for i in range(count):
    pattern = ("moving_left", "moving_right")[i % 2]
    path = folder / pattern / f"{i:04d}.webm"
    if not path.exists():
        write_synthetic_video(path, num_frames=frames + 8 * (i % 4), width=width, height=height, fps=25.0,
                              codec="vp9", pattern=pattern, seed=i)
print(f"{count} synthetic videos in {folder}")
'

run_part env "$PY" -c "$ENV_PY" "$DRY"
run_part tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py "${TESTS[@]}"
if [ "$SHARDS" = "$OUT/shards" ]; then
    run_part footage "$PY" -c "$FOOTAGE_PY" "$OUT/footage" "${FOOTAGE[@]}"
    selected shards && rm -rf "$SHARDS"
    run_part shards "$PY" -m shard_tools shard --source folder --videos "$OUT/footage" --out "$SHARDS" \
        --name gpucheck --shard-size 32 --min-side 128 --workers "$(nproc)" --no-progress
elif selected shards; then
    printf '%-12s %-24s %6ss  %s\n' shards "given" 0 "$SHARDS" | tee -a "$OUT/summary.txt"
fi
for recipe in svt lstcl; do
    extra=()
    [ "$recipe" = svt ] && extra=("${REPEATS[@]}")
    run_part "data_$recipe" "$PY" bench.py data --recipe "$recipe" --device "$DEVICE" --shards "$SHARDS" "${DATA[@]}" \
        "${extra[@]}" --out "$OUT/data_${recipe}_$DEVICE.json"
done
for recipe in svt lstcl; do
    run_part "ops_$recipe" "$PY" bench.py data --op-costs --recipe "$recipe" --device "$DEVICE" --shards "$SHARDS" \
        "${OPS[@]}" --out "$OUT/ops_${recipe}_$DEVICE.json"
done
run_part model "$PY" bench.py model "${MODEL[@]}" --out "$OUT/model_$TORCH_DEVICE.json"
run_part e2e "$PY" bench.py e2e --shards "$SHARDS" --out "$OUT/e2e.json" "${E2E[@]}"

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
tar -czf "$OUT.tar.gz" -C "$(dirname "$OUT")" --exclude "$(basename "$OUT")/footage" \
    --exclude "$(basename "$OUT")/shards" "$(basename "$OUT")"
echo "send back: $OUT.tar.gz"
exit $FAILED
