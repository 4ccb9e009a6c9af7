"""Pretrained weights: where a ``model.pretrained`` value is, and what its file holds.

A value is ``none``, a local checkpoint file (timm / DINO ViT, official TimeSformer, an SVT release or
an SVT run's export; torch or safetensors) or a timm pretrained tag (``vit_base_patch16_224.dino``),
found in timm's Hugging Face cache or downloaded into it. Everything here is file and network I/O;
fitting a state dict to a model (prefixes, embedding resampling, temporal weights) is the model
file's ``checkpoint_filter_fn`` (timm's layout).
"""
from __future__ import annotations

import argparse
import os

import timm
import timm.models
import torch
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors.torch import load_file

from common.typed_config import ConfigError

__all__ = ["DINO_VITB16_URL", "PretrainedUnavailable", "pretrained_state_dict", "read_checkpoint",
           "resolve_pretrained"]


class PretrainedUnavailable(ConfigError):
    """``model.pretrained`` names weights that cannot be had here; the message says how to get them."""


# DINO's own release of the self-supervised ImageNet ViT-B/16 (facebookresearch/dino README), the
# weights SVT starts from (paper Sec. 4); timm hosts the same network as vit_base_patch16_224.dino.
DINO_VITB16_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
_FILE_SUFFIXES = (".pth", ".pt", ".pyth", ".bin", ".safetensors", ".ckpt", ".tar")
# timm's own order of weight files in a Hub repo (timm.models._hub.load_state_dict_from_hf).
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _resolve(spec: str | None) -> tuple[str, str | None]:
    """``("none" | "file" | "timm", local path)`` for a ``model.pretrained`` value; raises PretrainedUnavailable."""
    if spec is None or spec == "none":
        return "none", None
    if os.path.isfile(spec):
        return "file", spec
    scratch = "or model.pretrained=none to train from scratch"
    looks_like_path = "/" in spec or os.sep in spec or spec.startswith(("~", "."))
    if not spec or looks_like_path or spec.lower().endswith(_FILE_SUFFIXES):
        raise PretrainedUnavailable(f"model.pretrained: {spec}: no such file; download the DINO ViT-B/16 weights "
                                    f"({DINO_VITB16_URL}) to it, or use the timm tag vit_base_patch16_224.dino, "
                                    f"{scratch}")
    cfg = timm.models.get_pretrained_cfg(spec)
    if cfg is None or not cfg.hf_hub_id:
        raise PretrainedUnavailable(f"model.pretrained: {spec!r} is neither an existing file nor a timm pretrained tag "
                                    f"(e.g. vit_base_patch16_224.dino), {scratch}")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
    for filename in files:  # timm's cache is the Hugging Face Hub cache: a cached file needs no network
        cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(cached, str):
            return "timm", cached
    for filename in files:
        try:
            # One request without retries: hf_hub_download alone retries for ~25 s per file offline.
            get_hf_file_metadata(hf_hub_url(cfg.hf_hub_id, filename), timeout=10)
        except RemoteEntryNotFoundError:
            continue
        except Exception as error:  # offline mode, no route, proxy, HTTP error: all "unreachable" here
            raise PretrainedUnavailable(
                f"model.pretrained: {spec!r} is not in timm's Hugging Face cache and the Hub is unreachable "
                f"({type(error).__name__}); fetch it where there is internet with `python -c \"import timm; "
                f"timm.create_model('{spec}', pretrained=True)\"` and copy ~/.cache/huggingface here, or set "
                f"model.pretrained to a local file (DINO ViT-B/16: {DINO_VITB16_URL}), {scratch}") from error
        try:
            return "timm", hf_hub_download(cfg.hf_hub_id, filename)
        except Exception as error:
            reason = " ".join(str(error).split())  # one line
            raise PretrainedUnavailable(f"model.pretrained: downloading {spec!r} from {cfg.hf_hub_id} failed "
                                        f"({type(error).__name__}: {reason}), {scratch}") from error
    raise PretrainedUnavailable(f"model.pretrained: the Hub repo {cfg.hf_hub_id} of {spec!r} holds none of {files}")


def resolve_pretrained(spec: str | None) -> str | None:
    """The local file ``model.pretrained`` stands for (None for ``none``), fetched into timm's cache if needed.

    ``spec`` is ``none``, a local checkpoint file, or a timm pretrained tag (``vit_base_patch16_224.dino``)
    found in timm's Hugging Face cache or downloaded into it. Raises ``PretrainedUnavailable`` (a
    ``ConfigError``: train.py prints it as one line and exits 2) when neither is reachable.
    """
    return _resolve(spec)[1]


def read_checkpoint(path: str) -> dict:
    """A checkpoint file's contents: safetensors, or a torch file loaded with ``weights_only=True``.

    DINO / SVT training checkpoints hold their ``argparse.Namespace`` args beside the weights; that
    class is allowed, nothing else beyond torch's safe types.
    """
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable / not a checkpoint: name the file and the reason
        raise ValueError(f"{path}: cannot read checkpoint ({error})") from error


def pretrained_state_dict(spec: str | None) -> tuple[str, dict] | None:
    """``(local file, its state dict)`` of a ``model.pretrained`` value, None for ``none``.

    A timm tag loads through timm itself (``timm.create_model(tag, pretrained=True)`` from the cached
    file), so its state dict has timm's names like any timm image checkpoint.
    """
    kind, path = _resolve(spec)
    if kind == "none":
        return None
    if kind == "timm":
        vit = timm.create_model(spec, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": path})
        return path, vit.state_dict()
    return path, read_checkpoint(path)
