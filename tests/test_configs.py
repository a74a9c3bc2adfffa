"""Every shipped config composes into its typed dataclass."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_prep.cli import conf_dir
from data_prep.config import PrepConfig
from data_prep.config import register_configs as register_prep
from slimpajama_train.config import TrainConfig
from slimpajama_train.config import register_configs as register_train

CONF = conf_dir()
TRAIN_GROUPS = ["model", "backend", "data", "optim", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    register_train()
    register_prep()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=name, overrides=overrides))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in TRAIN_GROUPS for o in _options(g)])
def test_train_group_option_composes(override):
    cfg = _compose("train", [override])
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("option", _options("tokenizer"))
def test_prep_tokenizer_option_composes(option):
    extra = ["tokenizer.model_path=/some/tokenizer.model"] if option == "pretrained" else []
    cfg = _compose("prep", [f"tokenizer={option}", *extra])
    assert isinstance(cfg, PrepConfig)


def test_model_sizes_have_the_advertised_parameter_counts():
    from slimpajama_train.model import ModelConfig, Transformer, count_parameters

    expected = {"125m": (0.10e9, 0.20e9), "350m": (0.30e9, 0.45e9), "1.3b": (1.1e9, 1.6e9), "3b": (2.4e9, 3.3e9),
                "7b": (6.0e9, 7.5e9)}
    import torch

    for name, (lo, hi) in expected.items():
        mcfg = _compose("train", [f"model={name}"]).model
        mcfg = ModelConfig(**{**mcfg.__dict__, "vocab_size": 32000, "max_seq_len": 2048})
        with torch.device("meta"):
            n = count_parameters(Transformer(mcfg))
        assert lo <= n <= hi, (name, n)


def test_bad_override_is_named():
    with pytest.raises(Exception, match="precision"):
        _compose("train", ["backend.precision=fp8"])
