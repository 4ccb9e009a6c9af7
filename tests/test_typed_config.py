"""The shared config vocabulary: overrides, nested sections, precision names."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from typed_config import ConfigError, apply_overrides, dataclass_from_dict, load_yaml_sections, precision_name, torch_dtype


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
    MOVED_KEYS: ClassVar[dict[str, str]] = {"a": "inner.a"}
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(b="protocol"))
    c: float = 0.5


def test_nested_sections_start_from_the_fields_default_and_moved_keys_name_their_place():
    outer = dataclass_from_dict(_Outer, {"inner": {"a": 3}}, "p")
    assert outer.inner == _Inner(a=3, b="protocol")  # the field's default instance, not _Inner()
    assert dataclass_from_dict(_Outer, {}, "p").inner.b == "protocol"
    with pytest.raises(ConfigError, match=r"^p\.a: moved to p\.inner\.a$"):
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
