"""Evaluate a pretrained video backbone: frozen-feature kNN and linear probe, the papers' linear-probe and
fine-tuning protocols, attention maps, the results table.

    python evaluate.py extract --checkpoint RUN/checkpoints --shards SHARDS/val --out feats/val.pt
    python evaluate.py knn --train feats/train.pt --val feats/val.pt --results runs/eval/results.json
    python evaluate.py finetune --checkpoint RUN/checkpoints --train-shards .. --val-shards .. --out runs/ft

``python evaluate.py --help`` lists every command. The command line is ``evaluation/cli.py``.
"""
import sys

if __name__ == "__main__":
    from common.process import setup_process

    setup_process()  # first: importing DeepSpeed reads DS_ACCELERATOR
    from evaluation.cli import main

    sys.exit(main(sys.argv[1:]))
