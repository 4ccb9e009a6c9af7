"""SVT / LSTCL pretraining on a DeepSpeed ZeRO engine.

    python train.py --config configs/demo_cpu.yaml                      # one process (CPU or 1 GPU)
    torchrun --nproc_per_node 8 train.py --config configs/svt_vitb16.yaml trainer.zero_stage=3
    deepspeed --num_gpus 8 train.py --config configs/svt_vitb16.yaml
    python train.py --config ... --resume auto                          # newest complete checkpoint
    python train.py --config ... --export runs/x/weights.pt             # consolidated fp32 weights

Trailing ``section.key=value`` arguments override the recipe (values parsed as YAML). The command
line is ``training/cli.py``.
"""
import sys

if __name__ == "__main__":
    from common.process import setup_process

    setup_process()  # first: importing DeepSpeed reads DS_ACCELERATOR
    from training.cli import main

    sys.exit(main(sys.argv[1:]))
