"""Long-lived processes give freed heap back to the OS: the trainer after every step, the
gateway driver after every step, so a run's private memory follows what it holds, not the
largest step it has had."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import torch

from forge.config import ModelConfig, TrainConfig, TrainerConfig
from forge.heap import _malloc_trim, release_free_heap
from forge.types import Sample

glibc_only = pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")


def private_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon"))


@glibc_only
def test_freed_heap_between_live_blocks_goes_back_to_the_os():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 96 KB blocks come from the heap (under glibc's mmap threshold). Every other one is
    # freed: 32 MB free in the heap, each stretch between two live blocks, none at its top.
    blocks = []
    for _ in range(680):
        block = libc.malloc(96 * 1024)
        ctypes.memset(block, 1, 96 * 1024)
        blocks.append(block)
    for block in blocks[0::2]:
        libc.free(block)
    held = private_mb()
    try:
        assert release_free_heap()
        assert held - private_mb() > 20, "malloc_trim gave back less than 20 of the 32 MB freed"
    finally:
        for block in blocks[1::2]:
            libc.free(block)


def test_a_training_step_gives_its_freed_heap_back(tiny_checkpoint, monkeypatch):
    import forge.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "release_free_heap", lambda: calls.append(True))
    trainer = trainer_module.Trainer(
        tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint)), TrainConfig(), TrainerConfig()
    )
    tokens = torch.randint(8, 16, (12,)).tolist()
    mask = [0] * 6 + [1] * 6
    trainer.train_step([Sample(tokens, mask, [-1.0] * 12, [0] * 12, advantage=1.0)] * 2)
    assert calls == [True]


@pytest.mark.slow
def test_a_gateway_run_gives_the_drivers_freed_heap_back_after_every_step(ray_session, tmp_path, monkeypatch):
    import forge.run.gateway as gateway_module
    from forge.config import load_config
    from forge.run.launch import train

    calls = []
    monkeypatch.setattr(gateway_module, "release_free_heap", lambda: calls.append(True))
    monkeypatch.chdir(tmp_path)  # the built-in agent is a module: no repository folder needed
    # Two steps of one group of 2 may all score alike: this tests the heap, not learning. One
    # group a step (2 agent processes, not 4) is enough: the driver frees its heap
    # after every step whatever the step played.
    overrides = ["train.max_steps=2", "rollout.tasks_per_step=1", "rollout.group_size=2"]
    cfg = load_config("gateway-smoke", [*overrides, "train.max_steps_without_signal=0"])
    assert train(cfg, tmp_path, progress=False).steps == 2
    assert calls == [True, True]
