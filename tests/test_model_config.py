"""The model configs: one validated definition (`dla_shared.model_config`) for torch and MLX, exact types,
numpy scalars accepted, every default a valid model, and mlx-lm's float tags read back."""

import json

import numpy as np
import pytest

import dla_mlx.models.dla_gated_deltanet as mlx_gdn
import dla_mlx.models.dla_mamba2 as mlx_mamba2
from dla_shared.hub import read_config
from dla_shared.model_config import DLAGatedDeltaNetConfig, DLAMamba2Config
from dla_torch.models import DLAGatedDeltaNetConfig as TorchGDN
from dla_torch.models import DLAMamba2Config as TorchMamba2

CLASSES = [pytest.param(DLAMamba2Config, id="mamba2"), pytest.param(DLAGatedDeltaNetConfig, id="gdn")]


def test_both_backends_use_the_shared_definition():
    assert mlx_mamba2.ModelArgs is DLAMamba2Config is TorchMamba2.shared  # torch's: transformers configs around it
    assert mlx_gdn.ModelArgs is DLAGatedDeltaNetConfig is TorchGDN.shared


@pytest.mark.parametrize("cls", CLASSES)
def test_every_default_is_a_valid_model(cls):
    config = cls()
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


BAD = {
    "hidden-size-string": ({"hidden_size": "256"}, TypeError, r"hidden_size must be an integer, got '256'"),
    "read-weight-norm-string": ({"read_weight_norm": "false"}, TypeError, r"read_weight_norm must be true or false"),
    "float-heads": ({"num_heads": 12.0}, TypeError, r"num_heads must be an integer, got 12.0"),
    "zero-layers": ({"num_hidden_layers": 0}, ValueError, r"num_hidden_layers must be > 0, got 0"),
    "nan-epsilon": ({"layer_norm_epsilon": float("nan")}, TypeError, r"layer_norm_epsilon must be a finite number"),
    "unknown-key": ({"hidden_sise": 256}, ValueError, r"unknown .*Config field\(s\) \['hidden_sise'\]"),
}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("change, error, match", BAD.values(), ids=BAD.keys())
def test_bad_fields_are_named(cls, change, error, match):
    with pytest.raises(error, match=match):
        cls.from_dict({**cls().to_dict(), **change})


def test_class_specific_fields_are_checked():
    with pytest.raises(ValueError, match=r"conv_size must be > 0, got 0"):
        DLAGatedDeltaNetConfig(conv_size=0)
    with pytest.raises(ValueError, match=r"conv_kernel must be > 0"):
        DLAMamba2Config(conv_kernel=0)
    with pytest.raises(ValueError, match=r"expand \* hidden_size \(1536\) must equal num_heads \* head_dim \(768\)"):
        DLAMamba2Config(num_heads=12)


def test_numpy_scalars_are_accepted():
    config = DLAGatedDeltaNetConfig(hidden_size=np.int64(64), num_heads=np.int32(2), head_dim=np.int64(16),
                                    layer_norm_epsilon=np.float32(1e-6), read_weight_norm=np.bool_(False),
                                    dla={"policy": "dla", "capacity": np.int64(4), "threshold": np.float32(0.5)})
    assert type(config.hidden_size) is int and type(config.layer_norm_epsilon) is float
    assert config.read_weight_norm is False and config.dla.capacity == 4


def test_mlx_lm_float_tags_are_read_back(tmp_path):
    """mlx-lm saves inf as {"__float__": "Infinity"} (Mamba-2's time_step_limit)."""
    data = {**DLAMamba2Config().to_dict(), "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert DLAMamba2Config.from_dict(read_config(tmp_path)).time_step_limit == (0.0, float("inf"))
