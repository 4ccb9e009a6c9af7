"""The shared config vocabulary: overrides, nested sections, precision names."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.precision import precision_name, torch_dtype
from common.typed_config import ConfigError, apply_overrides, dataclass_from_dict, load_yaml_sections


def test_one_precision_vocabulary():
    for names, dtype in ((("fp32", "float32"), torch.float32), (("bf16", "bfloat16"), torch.bfloat16),
                         (("fp16", "float16"), torch.float16)):
        for name in names:
            assert torch_dtype(name) is dtype
            assert precision_name(name) == names[0] and precision_name(name, long=True) == names[1]
    with pytest.raises(ConfigError, match="trainer.precision: must be one of fp32 / float32, bf16 / bfloat16, got 'fp16'"):
        precision_name("fp16", "trainer.precision", allowed=("fp32", "bf16"))
    with pytest.raises(ConfigError, match="precision: must be one of"):
        torch_dtype("half")


def test_trainer_and_data_take_either_spelling():
    from pipelines import DataConfig
    from training.config import config_from_dict

    cfg = config_from_dict({"trainer": {"precision": "bfloat16", "zero_stage": 2}})
    assert cfg.trainer.precision == "bf16"  # the name DeepSpeed's config and checkpoints use
    assert DataConfig(dtype="bf16").dtype == "bfloat16" and DataConfig.from_dict({"dtype": "fp32"}).dtype == "float32"
    with pytest.raises(ConfigError, match="data.dtype: must be one of"):
        DataConfig.from_dict({"dtype": "int8"})


@dataclasses.dataclass
class _Inner:
    a: int = 1
    b: str = "x"


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(b="protocol"))
    c: float = 0.5


def test_nested_sections_start_from_the_fields_default_and_a_key_of_the_wrong_level_is_unknown():
    outer = dataclass_from_dict(_Outer, {"inner": {"a": 3}}, "p")
    assert outer.inner == _Inner(a=3, b="protocol")  # the field's default instance, not _Inner()
    assert dataclass_from_dict(_Outer, {}, "p").inner.b == "protocol"
    with pytest.raises(ConfigError, match=r"^p\.a: unknown key \(valid keys of p: c, inner\)$"):
        dataclass_from_dict(_Outer, {"a": 3}, "p")
    with pytest.raises(ConfigError, match=r"p\.inner\.z: unknown key"):
        dataclass_from_dict(_Outer, {"inner": {"z": 3}}, "p")


def test_yaml_sections_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\nknn: {ks: [5]}\n")
    raw = load_yaml_sections(path, ["extract.data.eval.clips=2", "knn.temperature=0.1"])
    assert raw == {"extract": {"data": {"eval": {"clips": 2}}}, "knn": {"ks": [5], "temperature": 0.1}}
    assert load_yaml_sections(None, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    with pytest.raises(ConfigError, match="knn is not a section"):
        apply_overrides({"knn": 3}, ["knn.ks=1"])
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="c.yaml: expected a mapping"):
        load_yaml_sections(path)


@dataclasses.dataclass
class _Entry:
    path: str
    frames: int


@dataclasses.dataclass
class _Listing:
    entries: list[_Entry]
    counts: dict[str, int]
    scale: tuple[float, float] = (0.4, 1.0)
    sizes: tuple[int, ...] = ()


def test_required_keys_and_the_items_of_lists_and_mappings_are_checked_by_dotted_name():
    good = {"entries": [{"path": "a", "frames": 3}], "counts": {"x": 1}, "scale": [0, 1], "sizes": [2, 4]}
    listing = dataclass_from_dict(_Listing, good, "")
    assert listing.entries == [_Entry("a", 3)] and listing.scale == (0.0, 1.0) and listing.sizes == (2, 4)
    for bad, expected in ((dict(good, entries=[{"path": "a", "frames": 3}, {"path": "b"}]), r"^entries\[1\]\.frames: missing$"),
                          ({"entries": []}, r"^counts: missing$"),
                          (dict(good, counts={"x": "1"}), r"^counts\.x: expected an integer"),
                          (dict(good, scale=[1, 2, 3]), r"^scale: expected 2 values"),
                          (dict(good, sizes=[2, 4.5]), r"^sizes\[1\]: expected an integer"),
                          (dict(good, colour="red"), r"^colour: unknown key \(valid keys: counts, entries, scale, sizes\)$")):
        with pytest.raises(ConfigError, match=expected):
            dataclass_from_dict(_Listing, bad, "")


def test_the_loader_and_the_atomic_writes_import_the_standard_library_only():
    # Ray workers receive the shard_tools and common packages only (shard_tools/executors.py)
    import subprocess
    import sys

    code = ("import sys, common.typed_config, common.atomic_io, shard_tools.format; "
            "sys.exit(sorted({'yaml', 'numpy', 'torch'} & set(sys.modules)) or None)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
