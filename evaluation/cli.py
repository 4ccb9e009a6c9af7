"""Evaluate a pretrained video backbone: frozen-feature kNN and linear probe, fine-tuning, attention maps.

    python evaluate.py extract  --checkpoint RUN/checkpoints --shards SHARDS/train --out feats/train.pt
    python evaluate.py extract  --checkpoint RUN/checkpoints --shards SHARDS/val   --out feats/val.pt
    python evaluate.py knn      --train feats/train.pt --val feats/val.pt --results runs/eval/results.json
    python evaluate.py linear   --train feats/train.pt --val feats/val.pt --results runs/eval/results.json
    python evaluate.py attention --checkpoint RUN/checkpoints --shards SHARDS/val --out runs/eval/attention
    python evaluate.py probe    --checkpoint RUN/checkpoints --train-shards .. --val-shards .. --out runs/probe
    python evaluate.py finetune --checkpoint RUN/checkpoints --train-shards .. --val-shards .. --out runs/ft \
                                [--protocol svt-finetune | lstcl-finetune]
    python evaluate.py report   --results runs/eval/results.json --out runs/eval/results.md

``linear`` is the fast probe on saved frozen features (protocol ``linear-frozen``); ``probe`` is SVT's
linear probe as the paper trains it, on augmented slow-fast clips through the frozen backbone
(``svt-linear``); ``finetune`` runs SVT's or LSTCL's fine-tuning protocol. Every result names its
protocol and the settings changed from it.

Settings take the route of ``train.py``'s: ``--config FILE.yaml`` gives a protocol's settings as a section
(``extract:``, ``knn:``, ``linear:``, ``probe:``, ``finetune:``) whose keys are the dataclass fields (unknown
keys are an error); flags given on the command line override the file, and trailing ``section.key=value``
arguments (values parsed as YAML) override both, e.g. ``extract.data.eval.clips=2``. ``extract`` embeds the
loader's ``DataConfig`` as ``extract.data`` (``--shards`` is ``extract.data.shards``, ``--clips``
``extract.data.eval.clips``); ``probe`` / ``finetune`` embed ``EvalConfig`` as ``eval`` (``--clip-frames`` is
``finetune.eval.slow_frames``, ``--test-clips`` ``finetune.eval.clips``). Protocols: docs/evaluation.md.
A setting that does not fit names the ``--config`` file and the dotted key.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from common.errors import run_cli, writing_to
from common.typed_config import ConfigError, apply_overrides, dataclass_from_dict, load_yaml_sections, set_dotted
from evaluation.attention import denormalize, last_block_cls_attention, save_attention_grid
from evaluation.checkpoints import load_backbone
from evaluation.features import ExtractConfig, FeatureSet, extract_features, group_eval_views
from evaluation.finetune import run_finetune
from evaluation.knn import KNNConfig, knn_classify, knn_shuffled_label_control
from evaluation.linear_probe import LinearProbeConfig, shuffled_label_control, train_linear_probe
from evaluation.protocols import FINETUNE_PROTOCOLS, PROBE_PROTOCOLS, resolve_protocol
from evaluation.results import ResultRecord, append_result, write_report
from pipelines import build_loader
from shard_tools.format import read_manifest

__all__ = ["main", "build_parser"]

S = argparse.SUPPRESS  # config flags stay absent unless given, so the YAML / dataclass default applies


def _parse_kwargs(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{depth: 2, img_size: 64}}', got {text!r}")
    return value


SECTIONS = ("extract", "knn", "linear", "probe", "finetune")


def _section(args: argparse.Namespace, section: str, flags: dict[str, str] | tuple[str, ...]) -> dict[str, Any]:
    """Section ``section`` of ``--config``, overlaid with the flags given on the command line, then with the
    trailing ``section.key=value`` overrides (``common.typed_config.load_yaml_sections``, as ``train.py``).

    Args:
        flags: argparse dest -> the dotted key under ``section`` it sets (a tuple: the same names).
    """
    raw = load_yaml_sections(getattr(args, "config", None))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{args.config}: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    overrides = list(getattr(args, "overrides", None) or [])
    for text in overrides:
        if not text.startswith(section + "."):
            raise ValueError(f"override {text!r}: `evaluate.py {args.command}` reads the {section}: section "
                             f"(e.g. {section}.batch_size=4)")
    flags = flags if isinstance(flags, dict) else {name: name for name in flags}
    for dest, dotted in flags.items():  # flags as plain values (a string flag is not reparsed as YAML)
        if hasattr(args, dest):
            set_dotted(raw, [section, *dotted.split(".")], getattr(args, dest), f"{args.config}: {section}.{dotted}")
    apply_overrides(raw, overrides)
    return raw.get(section) or {}


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="train.py --export file, a checkpoint folder (step_N or its checkpoints/ root), or 'random'")
    p.add_argument("--backbone", default="teacher", choices=("teacher", "student"),
                   help="which pretrained network to evaluate (DINO / SVT evaluate the teacher)")
    p.add_argument("--model", default=None, help="models.build_backbone name (default: from the run config)")
    p.add_argument("--model-kwargs", type=_parse_kwargs, default=None,
                   help="backbone kwargs as YAML/JSON, overriding the run's (e.g. '{depth: 2, img_size: 64}')")
    p.add_argument("--seed", type=int, default=S, help="initialisation seed for --checkpoint random (0); "
                   "finetune: also the head init and data order")


# flag dest -> key under extract: (the loader's settings are the DataConfig section extract.data)
EXTRACT_FIELDS = {"shards": "data.shards", "data_device": "data.device", "num_threads": "data.num_threads",
                  **{name: f"data.eval.{name}" for name in ("clips", "crops", "slow_frames", "slow_size",
                                                            "fast_frames", "fast_size")},
                  **{name: name for name in ("batch_size", "views_per_forward", "device", "loader", "precision",
                                             "limit")}}


def _add_view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", default=S, help="extract.data.shards: labelled shard folder (holds manifest.json)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="extract.batch_size: videos per step (8)")
    p.add_argument("--clips", type=int, default=S, help="extract.data.eval.clips: temporal clips per video (1)")
    p.add_argument("--crops", type=int, default=S, choices=(1, 3), help="extract.data.eval.crops: spatial crops (3)")
    p.add_argument("--slow-frames", dest="slow_frames", type=int, default=S, help="extract.data.eval.slow_frames (8)")
    p.add_argument("--slow-size", dest="slow_size", type=int, default=S, help="extract.data.eval.slow_size (224)")
    p.add_argument("--fast-frames", dest="fast_frames", type=int, default=S, help="extract.data.eval.fast_frames (64)")
    p.add_argument("--fast-size", dest="fast_size", type=int, default=S, help="extract.data.eval.fast_size (96)")
    p.add_argument("--views-per-forward", dest="views_per_forward", type=int, default=S,
                   help="extract.views_per_forward: clips per backbone call, 0 = a whole batch of views (0)")
    p.add_argument("--device", default=S, help="extract.device: backbone device, cpu | cuda (cpu)")
    p.add_argument("--data-device", dest="data_device", default=S,
                   help="extract.data.device: DALI decoder, cpu | mixed | auto (cpu)")
    p.add_argument("--num-threads", dest="num_threads", type=int, default=S, help="extract.data.num_threads (2)")
    p.add_argument("--loader", default=S, choices=("dali", "baseline"), help="extract.loader (dali)")
    p.add_argument("--precision", default=S, help="extract.precision: fp32 | bf16, bf16 autocast on CUDA (fp32)")
    p.add_argument("--limit", type=int, default=S, help="extract.limit: stop after N videos, 0 = all (0)")


def _extract_config(args: argparse.Namespace, **fixed: Any):
    """``extract:`` settings; ``fixed`` are ``data.eval`` values the command sets itself (attention: one clip)."""
    values = _section(args, "extract", EXTRACT_FIELDS)
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    for name in ("mean", "std"):
        if name in data:  # features depend on the normalization the backbone was trained with
            raise ValueError(f"extract.data.{name}: taken from the checkpoint's run config, not a setting")
    if fixed:
        values = {**values, "data": {**data, "eval": {**(data.get("eval") or {}), **fixed}}}
    return dataclass_from_dict(ExtractConfig, values, "extract")


def _eval_loader(cfg, mean: tuple[float, ...], std: tuple[float, ...]):
    data_cfg = dataclasses.replace(cfg.data, mean=tuple(mean), std=tuple(std))
    return build_loader(data_cfg, batch_size=cfg.batch_size, loader=cfg.loader)


def _label_map(shards: str) -> dict[str, int]:
    """The shard folder's label map (errors name its manifest.json and what is wrong)."""
    return dict(read_manifest(shards).label_map)


def cmd_extract(args: argparse.Namespace) -> int:
    cfg = _extract_config(args)
    loaded = load_backbone(args.checkpoint, which=args.backbone, model_name=args.model,
                           model_kwargs=args.model_kwargs, seed=getattr(args, "seed", 0))
    mean, std = loaded.normalization()
    loader = _eval_loader(cfg, mean, std)
    meta = {"checkpoint": loaded.source, "backbone": loaded.which, "model": loaded.model_name,
            "model_kwargs": loaded.model_kwargs, "step": loaded.step, "shards": str(cfg.data.shards),
            "label_map": _label_map(cfg.data.shards), "extract": dataclasses.asdict(cfg), "mean": list(mean),
            "std": list(std)}
    started = time.perf_counter()
    features = extract_features(loaded.model, loader, loader.view_names, device=cfg.device, precision=cfg.precision,
                                views_per_forward=cfg.views_per_forward, limit=cfg.limit, meta=meta)
    seconds = time.perf_counter() - started
    features.meta["decode_failures"] = int(loader.stats.get("decode_failures", 0))
    features.meta["seconds"] = seconds
    features.save(args.out)
    counts = torch.bincount(features.labels[features.labels >= 0]).tolist() if len(features) else []
    print(f"extracted {len(features)} videos x {features.slow.shape[1]}-d (slow, fast) from {cfg.data.shards} "
          f"[{loaded.which} of {loaded.source}] -> {args.out}; per-label counts {counts}, "
          f"views {features.meta['views']}; {seconds:.1f} s, {len(features) / seconds:.2f} videos/s")
    return 0


def _load_pair(train_path: str, val_path: str):
    train, val = FeatureSet.load(train_path), FeatureSet.load(val_path)
    if train.slow.shape[1] != val.slow.shape[1]:
        raise ValueError(f"{train_path} has {train.slow.shape[1]}-d features, {val_path} "
                         f"{val.slow.shape[1]}-d: extracted with different backbones")
    train_map, val_map = train.meta.get("label_map"), val.meta.get("label_map")
    if train_map and val_map and train_map != val_map:
        raise ValueError(f"label maps differ between {train_path} and {val_path}: shard both splits "
                         f"with the same --label-map")
    for path, split in ((train_path, train), (val_path, val)):
        if len(split) and int(split.labels.min()) < 0:
            raise ValueError(f"{path}: holds unlabelled samples (label -1); evaluation needs labels")
    num_classes = (max(train_map.values()) + 1 if train_map
                   else int(max(train.labels.max(), val.labels.max())) + 1)
    return train, val, num_classes


def _record_base(train, val, train_path: str, val_path: str) -> dict[str, Any]:
    return {"checkpoint": str(train.meta.get("checkpoint", "?")), "backbone": str(train.meta.get("backbone", "?")),
            "train_data": str(train.meta.get("shards", train_path)), "val_data": str(val.meta.get("shards", val_path))}


def _changes(cfg, cls, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Settings of ``cfg`` that differ from the protocol's defaults (the dataclass ``cls``'s); the seed is
    not part of a protocol."""
    reference = cls()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)
            if (names is None or f.name in names) and f.name != "seed"
            and getattr(cfg, f.name) != getattr(reference, f.name)}


def cmd_knn(args: argparse.Namespace) -> int:
    values = _section(args, "knn", ("ks", "temperature", "chunk_size"))
    cfg = dataclass_from_dict(KNNConfig, values, "knn")
    train, val, num_classes = _load_pair(args.train, args.val)
    for kind in args.feature:
        result = knn_classify(train.feature(kind), train.labels, val.feature(kind), val.labels, cfg, num_classes)
        control = knn_shuffled_label_control(train.feature(kind), train.labels, val.feature(kind), val.labels, cfg,
                                             args.control_repeats, args.control_seed, num_classes)
        for k in cfg.ks:
            metrics = {**result[f"k{k}"], "num_train": len(train), "num_val": len(val), "num_classes": num_classes}
            record = ResultRecord(protocol="knn", variant=f"k={k}", feature=kind, metrics=metrics,
                                  control=control[f"k{k}"] if control else None,
                                  settings={"temperature": cfg.temperature, "k": k},
                                  changes=_changes(cfg, KNNConfig, ("temperature",)),
                                  **_record_base(train, val, args.train, args.val))
            print(f"knn {kind:8s} k={k:3d}: top-1 {metrics['top1']:.1f}  top-5 {metrics['top5']:.1f}"
                  + (f"  (shuffled-label control top-1 {record.control['top1']:.1f} over {args.control_repeats} runs)"
                     if control else ""))
            if args.results:
                append_result(args.results, record)
    return 0


LINEAR_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "standardize", "seed")


def cmd_linear(args: argparse.Namespace) -> int:
    cfg = dataclass_from_dict(LinearProbeConfig, _section(args, "linear", LINEAR_FIELDS), "linear")
    train, val, num_classes = _load_pair(args.train, args.val)
    for kind in args.feature:
        result = train_linear_probe(train.feature(kind), train.labels, val.feature(kind), val.labels, cfg, num_classes)
        head = result.pop("head")
        control = (shuffled_label_control(train.feature(kind), train.labels, val.feature(kind), val.labels, cfg,
                                          args.control_repeats, num_classes) if args.control_repeats else None)
        record = ResultRecord(protocol="linear-frozen", variant=f"{cfg.epochs} epochs", feature=kind,
                              metrics={**result, "num_classes": num_classes}, control=control,
                              settings=dict(vars(cfg)), changes=_changes(cfg, LinearProbeConfig),
                              **_record_base(train, val, args.train, args.val))
        print(f"linear-frozen {kind:8s}: top-1 {result['top1']:.1f}  top-5 {result['top5']:.1f}  "
              f"(train top-1 {result['train_top1']:.1f}, loss {result['final_loss']:.3f})"
              + (f"  shuffled-label control top-1 {control['top1']:.1f} over {control['repeats']} runs"
                 if control else ""))
        if args.results:
            append_result(args.results, record)
        if args.save_head:
            path = Path(args.save_head).with_suffix(f".{kind}.pt")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": head.state_dict(), "feature": kind, "settings": vars(cfg)}, path)
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    cfg = _extract_config(args, clips=1)
    loaded = load_backbone(args.checkpoint, which=args.backbone, model_name=args.model,
                           model_kwargs=args.model_kwargs, seed=getattr(args, "seed", 0))
    mean, std = loaded.normalization()
    loader = _eval_loader(cfg, mean, std)
    slow_views = group_eval_views(loader.view_names)["slow"]
    # The centre crop of the first clip (crops are numbered left/top, centre, right/bottom).
    view = args.view or slow_views[len(slow_views) // 2]
    if view not in loader.view_names:
        raise ValueError(f"--view {view!r} is not an eval view; choose from {loader.view_names}")
    requested = set(args.keys or [])
    remaining = set(requested)
    written = []
    model = loaded.model.to(cfg.device)

    def done() -> bool:
        return not remaining if requested else len(written) >= args.num_keys

    for batch in loader:
        for row, key in enumerate(batch["key"]):
            if done() or (requested and key not in remaining):
                continue
            clip = batch[view][row: row + 1].to(cfg.device)
            attention = last_block_cls_attention(model, clip)[0]
            path = save_attention_grid(Path(args.out) / f"{key}.png", denormalize(clip[0], mean, std), attention,
                                       title=f"{key} (label {int(batch['label'][row])}) - last-block CLS attention, "
                                             f"{loaded.which} of {loaded.source}, view {view}")
            written.append(str(path))
            remaining.discard(key)
        if done():
            break
    if remaining:
        raise ValueError(f"keys not found in {cfg.data.shards}: {sorted(remaining)}")
    print("\n".join(f"wrote {p}" for p in written))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    text = write_report(args.results, args.out)
    print(text, end="")
    print(f"wrote {args.out}")
    return 0


def _run_protocol(args: argparse.Namespace, section: str, default_protocol: str, allowed: tuple[str, ...]) -> int:
    """``finetune`` / ``probe``: the protocol's settings overlaid with the section, then one run
    (``evaluation.finetune.run_finetune``)."""
    out = Path(args.out)
    resume = {"auto": "auto", "none": None}.get(args.resume, str(out / "checkpoints" / str(args.resume)))
    if resume not in ("auto", None) and not any(Path(resume).glob("*model_states.pt")):
        # checked before DeepSpeed, whose loader only asserts on a folder without its files
        raise ValueError(f"--resume {args.resume}: {resume} is not a fine-tuning checkpoint (no DeepSpeed "
                         f"model states); give 'auto', 'none' or an epoch folder under {out / 'checkpoints'}")
    cfg = resolve_protocol(_section(args, section, FINETUNE_FIELDS), default_protocol, allowed, section)
    run_finetune(cfg, checkpoint=args.checkpoint, which=args.backbone, model_name=args.model,
                 model_kwargs=args.model_kwargs, train_shards=args.train_shards, val_shards=args.val_shards, out=out,
                 resume=resume, results=args.results)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return _run_protocol(args, "finetune", "svt-finetune", FINETUNE_PROTOCOLS)


def cmd_probe(args: argparse.Namespace) -> int:
    return _run_protocol(args, "probe", "svt-linear", PROBE_PROTOCOLS)


# flag dest -> key under finetune: / probe: (the clip shapes and test views are the EvalConfig section eval)
FINETUNE_FIELDS = {**{name: name for name in (
                       "protocol", "epochs", "lr", "schedule", "milestones", "gamma", "momentum", "weight_decay",
                       "batch_size", "head_init_std", "inputs", "train_span", "train_stride", "zero_stage",
                       "precision", "num_threads", "loader", "max_steps", "ckpt_every_epochs", "torch_threads",
                       "seed")},
                   "clip_frames": "eval.slow_frames", "clip_size": "eval.slow_size", "fast_frames": "eval.fast_frames",
                   "fast_size": "eval.fast_size", "test_clips": "eval.clips", "test_crops": "eval.crops",
                   "test_stride": "eval.stride"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="slow / fast CLS features of labelled shards from a checkpoint")
    _add_backbone_args(p)
    _add_view_args(p)
    p.add_argument("--out", required=True, help="feature file (.pt or .npz)")
    p.set_defaults(func=cmd_extract)

    for name, func, help_text in (("knn", cmd_knn, "weighted kNN (cosine, T=0.07) on saved features"),
                                  ("linear", cmd_linear, "fast linear probe (SGD, cosine lr) on saved frozen features "
                                                          "(protocol linear-frozen)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--train", required=True, help="training feature file from 'extract'")
        p.add_argument("--val", required=True, help="validation feature file from 'extract'")
        p.add_argument("--feature", nargs="+", default=["slowfast", "slow"], choices=("slowfast", "slow", "fast"),
                       help="features evaluated: slowfast = slow + fast (SVT Fig. 3); slow for the ablation")
        p.add_argument("--results", default=None, help="append the numbers to this results JSON")
        p.set_defaults(func=func)
        if name == "knn":
            p.add_argument("--k", dest="ks", type=int, nargs="+", default=S, help="neighbour counts (20 5)")
            p.add_argument("--temperature", type=float, default=S, help="vote temperature (0.07)")
            p.add_argument("--chunk-size", dest="chunk_size", type=int, default=S, help="test rows per matmul")
            p.add_argument("--control-repeats", type=int, default=3,
                           help="runs with shuffled training labels (mean reported), 0 = none (3)")
            p.add_argument("--control-seed", type=int, default=1)
        else:
            p.add_argument("--epochs", type=int, default=S, help="(20)")
            p.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="(256)")
            p.add_argument("--lr", type=float, default=S, help="at batch 256, scaled linearly (0.1)")
            p.add_argument("--momentum", type=float, default=S, help="(0.9)")
            p.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, help="(0)")
            p.add_argument("--no-standardize", dest="standardize", action="store_false", default=S,
                           help="train on the raw features instead of standardised ones")
            p.add_argument("--seed", type=int, default=S, help="(0)")
            p.add_argument("--control-repeats", type=int, default=3,
                           help="shuffled-label control runs, 0 = none (3)")
            p.add_argument("--save-head", default=None, help="save the trained linear head(s) here")
        p.add_argument("--config", default=None, help="YAML with knn: / linear: sections")

    p = sub.add_parser("attention", help="last-block CLS attention maps as PNG grids over frames")
    _add_backbone_args(p)
    _add_view_args(p)
    p.add_argument("--keys", nargs="*", default=None, help="sample keys to draw (default: the first --num-keys)")
    p.add_argument("--num-keys", type=int, default=4)
    p.add_argument("--view", default=None, help="eval view to draw (default: centre crop of the slow clip)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.set_defaults(func=cmd_attention)

    for name, func, protocols, help_text in (
            ("probe", cmd_probe, PROBE_PROTOCOLS, "SVT's linear probe: a linear head trained on augmented slow-fast "
                                                  "clips through the frozen backbone (DeepSpeed)"),
            ("finetune", cmd_finetune, FINETUNE_PROTOCOLS, "end-to-end fine-tuning with a linear head through "
                                                           "DeepSpeed (SVT or LSTCL protocol)")):
        p = sub.add_parser(name, help=help_text)
        _add_backbone_args(p)
        p.add_argument("--protocol", default=S, choices=protocols,
                       help=f"the paper protocol the settings start from ({protocols[0]}); flags override it")
        p.add_argument("--train-shards", required=True)
        p.add_argument("--val-shards", required=True)
        p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, results)")
        p.add_argument("--resume", default="auto", help="'auto' (newest checkpoint in --out), a folder, or 'none'")
        p.add_argument("--results", default=None, help="append the test numbers to this results JSON")
        for flag, kind in (("epochs", int), ("lr", float), ("schedule", str), ("gamma", float), ("momentum", float),
                           ("weight_decay", float), ("batch_size", int), ("head_init_std", float), ("inputs", str),
                           ("clip_frames", int), ("clip_size", int), ("fast_frames", int), ("fast_size", int),
                           ("train_span", float), ("train_stride", int), ("test_clips", int), ("test_crops", int),
                           ("test_stride", int), ("zero_stage", int), ("precision", str), ("num_threads", int),
                           ("loader", str), ("max_steps", int), ("ckpt_every_epochs", int), ("torch_threads", int)):
            p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=S,
                           help=f"{name}.{FINETUNE_FIELDS[flag]}")
        p.add_argument("--milestones", type=int, nargs="*", default=S, help="lr decay epochs (svt-finetune: 11 14)")
        p.set_defaults(func=func)

    for p in (sub.choices["extract"], sub.choices["attention"], sub.choices["probe"], sub.choices["finetune"]):
        p.add_argument("--config", default=None, help="YAML with extract: / probe: / finetune: sections")
    for name in ("extract", "attention", "knn", "linear", "probe", "finetune"):
        section = "extract" if name == "attention" else name
        sub.choices[name].add_argument(
            "overrides", nargs="*", metavar=f"{section}.key=value",
            help=f"overrides of the {section}: section, values parsed as YAML (as train.py's), applied after "
                 f"--config and the flags, e.g. " + ("extract.data.eval.clips=2" if section == "extract"
                                                     else f"{section}.batch_size=4" if section != "knn"
                                                     else "knn.temperature=0.1"))

    p = sub.add_parser("report", help="render the results JSON as a markdown table")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True, help="markdown file")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str]) -> int:
    """Exit status 0 on success; 2 with one ``error: <field or file>: <reason>`` line for bad input or an
    output that cannot be written."""
    return run_cli(_run, argv)


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with writing_to(getattr(args, "out", None), getattr(args, "results", None)):
        try:
            return args.func(args)
        except ConfigError as error:  # a setting read with --config: name the file, as train.py does
            config = getattr(args, "config", None)
            if config is None or str(error).startswith(f"{config}:"):
                raise
            raise ConfigError(f"{config}: {error}") from error
