"""Training: DeepSpeed engine, EMA teacher, schedules, checkpoints, metrics (train.py is the entry point)."""
