"""Objectives: SVT (DINO-style) loss, LSTCL losses (MoCo v3, BYOL, SimSiam), per-step schedules."""
from objectives.lstcl import BYOLLoss, MoCoV3Loss, SimSiamLoss
from objectives.schedules import cosine_schedule
from objectives.svt import PAIR_SETS, SVTLoss

__all__ = ["SVTLoss", "PAIR_SETS", "MoCoV3Loss", "BYOLLoss", "SimSiamLoss", "cosine_schedule"]
