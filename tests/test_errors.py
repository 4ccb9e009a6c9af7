"""The error promise of the three command lines: a bad input ends with one line on stderr that names the
file or field, and exit status 2 (no traceback).

Real subprocess runs of ``train.py``, ``evaluate.py`` and ``python -m shard_tools shard`` on real tiny
shards. A full disk and a read-only output folder are real file systems: a small or a read-only tmpfs
mounted in a private mount namespace of the command (``unshare --mount``, as non-root with ``--user
--map-root-user``), so nothing is mounted on the host and nothing is left behind. ``chmod`` would not do:
root writes through it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_fixtures import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

# the tiny SVT run of test_train_e2e (1-block TimeSformer, 32 px views): seconds to its first checkpoint
TRAIN = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
         "model.backbone=timesformer_tiny_patch16", "model.backbone_kwargs={depth: 1, img_size: 32, num_frames: 4}",
         "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16", "data.svt.global_frames=[4, 2]",
         "data.svt.global_size=32", "data.svt.local_frames=[2, 2]", "data.svt.local_size=16", "data.num_threads=1",
         "trainer.batch_size_per_gpu=2", "trainer.max_steps=2", "trainer.ckpt_every_steps=2",
         "trainer.progress_bar=false", "trainer.torch_threads=1", "optim.lr_reference_batch=0", "optim.warmup_epochs=0"]
EVALUATE = [sys.executable, str(ROOT / "evaluate.py")]
RANDOM_TINY = ["--checkpoint", "random", "--model", "timesformer_tiny_patch16",
               "--model-kwargs", "{depth: 1, img_size: 32, num_frames: 4}"]
EXTRACT = [*EVALUATE, "extract", *RANDOM_TINY, "--slow-frames", "4", "--slow-size", "32", "--fast-frames", "4",
           "--fast-size", "16", "--num-threads", "1", "--batch-size", "2"]
SHARD = [sys.executable, "-m", "shard_tools", "shard", "--source", "folder", "--shard-size", "2", "--short-side", "48",
         "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """VP9 and H.264 shards of 4 synthetic clips (made by ``python -m shard_tools``), a folder without a
    manifest, a manifest that lists no shards, and a plain file."""
    from footage import write_synthetic_video

    root = tmp_path_factory.mktemp("errors")
    videos = root / "videos"
    for pattern in ("moving_left", "moving_right"):
        for index in range(2):
            write_synthetic_video(videos / pattern / f"{index}.webm", num_frames=24, width=64, height=48, fps=25.0,
                                  codec="vp9", pattern=pattern, seed=index)
    paths = {"videos": videos}
    for codec in ("vp9", "h264"):
        paths[codec] = root / f"shards_{codec}"
        result = subprocess.run([*SHARD, "--videos", str(videos), "--out", str(paths[codec]), "--codec", codec],
                                cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    paths["no_manifest"] = root / "no_manifest"
    paths["no_manifest"].mkdir()
    paths["no_shards"] = root / "no_shards"
    paths["no_shards"].mkdir()
    manifest = json.loads((paths["vp9"] / "manifest.json").read_text())
    (paths["no_shards"] / "manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("not a folder\n")
    return paths


def _mount_prefix() -> list[str] | None:
    """``unshare`` arguments for a private mount namespace, or None where the system allows none."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def _with_tmpfs(cmd: list[str], mount_point: Path, options: str) -> list[str]:
    """``cmd`` run with a tmpfs mounted (``options``: ``size=1M`` = a nearly full disk, ``ro``) on ``mount_point``."""
    prefix = _mount_prefix()
    if prefix is None:
        pytest.skip("needs a private mount namespace (unshare --mount) for a real full / read-only file system")
    mount_point.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'
    return [*prefix, "sh", "-c", script, "sh", options, str(mount_point), *cmd]


# (id, command, tmpfs mount options on {tmp}/mnt or None, what the line must name)
CASES = [
    ("train-shards-missing", [*TRAIN, "data.shards={tmp}/nowhere"], None, ["{tmp}/nowhere/manifest.json"]),
    ("train-shards-empty", [*TRAIN, "data.shards="], None, ["data.shards"]),
    ("train-shards-no-manifest", [*TRAIN, "data.shards={no_manifest}"], None, ["{no_manifest}/manifest.json"]),
    ("train-shards-none-listed", [*TRAIN, "data.shards={no_shards}"], None,
     ["{no_shards}/manifest.json", "lists no shards"]),
    ("train-h264-on-cpu", [*TRAIN, "data.shards={h264}", "data.device=cpu"], None, ["{h264}/manifest.json", "H.264"]),
    ("train-resume-missing", [*TRAIN, "data.shards={vp9}", "--resume", "{tmp}/nope"], None, ["--resume {tmp}/nope"]),
    ("train-out-dim-0", [*TRAIN, "data.shards={vp9}", "model.out_dim=0"], None, ["model.out_dim"]),
    ("train-hidden-dim-negative", [*TRAIN, "data.shards={vp9}", "model.hidden_dim=-8"], None, ["model.hidden_dim"]),
    ("train-global-size-0", [*TRAIN, "data.shards={vp9}", "data.svt.global_size=0"], None, ["data.svt.global_size"]),
    ("train-output-read-only", [*TRAIN, "data.shards={vp9}", "trainer.output_dir={tmp}/mnt/run"], "ro",
     ["{tmp}/mnt/run", "read-only file system"]),
    # 1 MiB holds config.yaml, metrics and TensorBoard but not the first checkpoint (torch.save fails)
    ("train-disk-full", [*TRAIN, "data.shards={vp9}", "trainer.output_dir={tmp}/mnt/run"], "size=1M",
     ["{tmp}/mnt/run", "no space left on device", "--resume auto"]),
    ("evaluate-shards-missing", [*EXTRACT, "--shards", "{tmp}/nowhere", "--out", "{tmp}/f.pt"], None,
     ["{tmp}/nowhere/manifest.json"]),
    ("evaluate-h264-on-cpu", [*EXTRACT, "--shards", "{h264}", "--out", "{tmp}/f.pt"], None, ["{h264}/manifest.json"]),
    ("evaluate-output-read-only", [*EXTRACT, "--shards", "{vp9}", "--out", "{tmp}/mnt/f.pt"], "ro",
     ["{tmp}/mnt/f.pt", "read-only file system"]),
    ("finetune-resume-missing", [*EVALUATE, "finetune", *RANDOM_TINY, "--train-shards", "{vp9}", "--val-shards",
                                 "{vp9}", "--out", "{tmp}/ft", "--resume", "{tmp}/nope"], None,
     ["--resume {tmp}/nope"]),
    # the probe shares the fine-tuning run's resume check (it failed later, inside the trainer, without the flag)
    ("probe-resume-missing", [*EVALUATE, "probe", *RANDOM_TINY, "--train-shards", "{vp9}", "--val-shards",
                              "{vp9}", "--out", "{tmp}/probe", "--resume", "{tmp}/nope"], None,
     ["--resume {tmp}/nope"]),
    ("shard-out-is-a-file", [*SHARD, "--videos", "{videos}", "--out", "{a_file}"], None, ["--out {a_file}"]),
    ("shard-kinetics-without-csv", [*SHARD[:4], "--source", "kinetics", "--videos", "{videos}", "--out", "{tmp}/s"],
     None, ["--annotations"]),
    ("shard-output-read-only", [*SHARD, "--videos", "{videos}", "--out", "{tmp}/mnt/s"], "ro",
     ["{tmp}/mnt/s", "read-only file system"]),
    # 16 KiB: the first encoded videos fit, the job's next write does not
    ("shard-disk-full", [*SHARD, "--videos", "{videos}", "--out", "{tmp}/mnt/s"], "size=16k",
     ["{tmp}/mnt/s", "no space left on device", "rerun"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, mount, named", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_exit_2(inputs, tmp_path, command, mount, named):
    values = {**{k: str(v) for k, v in inputs.items()}, "tmp": str(tmp_path)}

    def fill(text: str) -> str:  # not str.format: the model kwargs are YAML in braces
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        return text

    cmd = [fill(part) for part in command]
    if mount is not None:
        cmd = _with_tmpfs(cmd, tmp_path / "mnt", mount)
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-4000:])
    assert len(lines) == 1, result.stderr[-4000:]
    assert lines[0].startswith(("error: ", "shard_tools: error: ")), lines[0]
    for text in named:
        assert fill(text).lower() in lines[0].lower(), (text, lines[0])
