"""Every config in configs/ loads, validates and names an installed env."""

from pathlib import Path

import pytest

from forge.config import load_config
from forge.env.registry import resolve_env

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_all_there():
    assert {"smoke.yaml", "qwen3-0.6b-lora.yaml", "qwen3-8b-multinode.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_its_env_is_installed(path):
    cfg = load_config(path)
    assert resolve_env(cfg.env.name) is not None


def test_smoke_config_needs_no_gpu():
    cfg = load_config(CONFIGS[0].parent / "smoke.yaml")
    assert cfg.train.num_gpus == 0 and cfg.rollout.num_gpus_per_worker == 0 and cfg.model.path is None


@pytest.mark.parametrize("name", ["qwen3-0.6b-lora.yaml", "qwen3-8b-multinode.yaml"])
def test_gpu_configs_reserve_gpus_for_trainer_and_workers(name):
    cfg = load_config(CONFIGS[0].parent / name)
    assert cfg.train.num_gpus > 0 and cfg.rollout.num_gpus_per_worker > 0
    assert cfg.model.dtype == "bfloat16"


def test_single_gpu_config_fits_on_one_gpu():
    cfg = load_config(CONFIGS[0].parent / "qwen3-0.6b-lora.yaml")
    assert cfg.train.num_gpus + cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker <= 1


def test_multinode_config_uses_sixteen_gpus_as_documented():
    cfg = load_config(CONFIGS[0].parent / "qwen3-8b-multinode.yaml")
    assert cfg.train.num_gpus + cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker == 16
