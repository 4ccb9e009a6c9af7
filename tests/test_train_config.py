"""Recipe loading and validation: every bad value fails at start with a message naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, Config, apply_overrides, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.data is not None
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_recipe_values_from_the_papers():
    svt = load_config(ROOT / "configs" / "svt_vitb16.yaml")
    assert (svt.model.backbone, svt.model.out_dim, svt.trainer.epochs) == ("timesformer_base_patch16", 65536, 20)
    assert (svt.optim.lr, svt.optim.lr_reference_batch, svt.optim.clip_grad) == (5e-4, 256, 3.0)
    # paper Sec. 4.1: wd 0.04 -> 0.1, 5 warmup epochs (official code: 0.4, 10); DINO's per-parameter clipping
    assert (svt.optim.weight_decay, svt.optim.weight_decay_end, svt.optim.warmup_epochs) == (0.04, 0.1, 5)
    assert (svt.optim.clip_mode, svt.optim.model_no_weight_decay) == ("per_param", False)
    assert (svt.objective.teacher_temp, svt.objective.student_temp, svt.objective.center_momentum) == (0.04, 0.1, 0.9)
    assert (svt.objective.momentum_teacher, svt.optim.freeze_last_layer_epochs) == (0.996, 1.0)
    moco = load_config(ROOT / "configs" / "lstcl_timesformer_mocov3.yaml")
    assert (moco.trainer.epochs, moco.optim.warmup_epochs, moco.objective.temperature) == (200, 40, 0.2)
    assert moco.objective.momentum_teacher == 0.99 and moco.data.recipe == "lstcl"
    byol = load_config(ROOT / "configs" / "lstcl_timesformer_byol.yaml")
    assert (byol.objective.momentum_teacher, byol.objective.momentum_teacher_final) == (0.996, 1.0)  # BYOL Sec. 3.3
    assert load_config(ROOT / "configs" / "lstcl_stswin_mocov3.yaml").optim.model_no_weight_decay


def test_every_recipe_value_has_a_source_comment():
    """Each value line of the SVT / LSTCL recipes says where it comes from (paper, official code, our choice)."""
    for path in [ROOT / "configs" / "svt_vitb16.yaml", *sorted((ROOT / "configs").glob("lstcl_*.yaml"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.endswith(":"):
                continue  # comments and section headers
            if stripped.startswith("name:"):
                continue  # objective.name: the recipe's identity
            assert "#" in line, f"{path.name}:{number}: no source comment on {stripped!r}"


@pytest.mark.parametrize("overrides, field", [
    (["trainer.zero_stag=3"], "trainer.zero_stag"),
    (["trainer.precision=bf16", "trainer.zero_stage=0"], "trainer.precision"),
    (["trainer.zero_stage=4"], "trainer.zero_stage"),
    (["trainer.batch_size_per_gpu=0"], "trainer.batch_size_per_gpu"),
    (["trainer.batch_size_per_gpu=two"], "trainer.batch_size_per_gpu"),
    (["trainer.on_nonfinite_loss=ignore"], "trainer.on_nonfinite_loss"),
    (["trainer.ckpt_every_steps=-1"], "trainer.ckpt_every_steps"),  # 0 (no checkpoints) is allowed
    (["optim.lr=-1"], "optim.lr"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.clip_mode=norm"], "optim.clip_mode"),
    (["objective.name=dino"], "objective.name"),
    (["objective.teacher_temp=0"], "objective.teacher_temp"),
    (["objective.name=mocov3"], "data.recipe"),  # an SVT data section cannot feed MoCo v3
    (["model.unknown=1"], "model.unknown"),
    (["data.svt.global_sise=64"], "data.svt.global_sise"),
    (["model.out_dim=0"], "model.out_dim"),  # else DeepSpeed fails on an empty parameter group
    (["model.hidden_dim=-8"], "model.hidden_dim"),  # else torch: negative dimension
    (["model.drop_path_rate=1.0"], "model.drop_path_rate"),
    (["data.svt.global_size=0"], "data.svt.global_size"),  # else DALI: non-uniform batch shapes
    (["data.svt.local_size=-1"], "data.svt.local_size"),
    (["data.shards="], "data.shards"),
    (["runtime.x=1"], "runtime"),
    (["data.repeats=3"], "data.repeats"),  # the demo's 4 view-sets per rank hold no whole videos at R=3
    (["data.repeats=0"], "data.repeats"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "demo_cpu.yaml", overrides)
    assert field in str(info.value)
    assert "demo_cpu.yaml" in str(info.value)


def test_repeats_divide_the_per_rank_batch_which_stays_in_view_sets():
    with pytest.raises(ConfigError, match=r"data.repeats: 3 view-sets per video must divide "
                                          r"trainer.batch_size_per_gpu=4"):
        load_config(ROOT / "configs" / "demo_cpu.yaml", ["data.repeats=3"])
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["data.repeats=2"])
    assert (cfg.data.repeats, cfg.trainer.batch_size_per_gpu, cfg.objective.mask_same_video) == (2, 4, True)


def test_overrides_parse_as_yaml():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml",
                      ["trainer.zero_stage=3", "optim.betas=[0.9, 0.95]", "trainer.precision=bf16",
                       "data.svt.local_frames=[2, 2]", "optim.lr=1e-3"])
    assert cfg.trainer.zero_stage == 3 and cfg.trainer.precision == "bf16"
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.lr == 1e-3
    assert tuple(cfg.data.svt.local_frames) == (2, 2)


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["zero_stage"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_train_py_reports_config_errors(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
                             "trainer.precision=bf16", "trainer.zero_stage=0"], capture_output=True, text=True,
                            cwd=ROOT, env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2
    assert "trainer.precision" in result.stderr and "zero_stage >= 1" in result.stderr


def test_data_is_a_typed_section_and_train_py_needs_its_shards(tmp_path, capsys):
    from pipelines import DataConfig
    from training.cli import main

    assert Config().data == DataConfig() and config_from_dict({}).data == DataConfig()  # tests feed their own data
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["data.dtype=bf16", "trainer.precision=bfloat16"])
    assert isinstance(cfg.data, DataConfig) and (cfg.data.dtype, cfg.trainer.precision) == ("bfloat16", "bf16")
    assert config_to_dict(cfg)["data"]["svt"] == config_to_dict(load_config(ROOT / "configs" / "demo_cpu.yaml"))["data"]["svt"]
    recipe = tmp_path / "no_data.yaml"
    recipe.write_text("model: {backbone: tiny_stand_in}\n")
    assert main(["--config", str(recipe)]) == 2
    assert "no_data.yaml: data.shards: missing" in capsys.readouterr().err
