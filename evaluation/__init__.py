"""Evaluation of pretrained video backbones: frozen features (kNN, linear probe), fine-tuning,
attention maps and the results table. ``evaluate.py`` is the command line over these pieces."""
