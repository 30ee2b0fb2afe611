"""Start a benchmark's child as several data-parallel trainer processes (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(module: str, child_args: list[str], world_size: int, timeout: float = 900) -> None:
    """Run `python -m MODULE --child ARGS...` as `world_size` ranks of one process group on
    CPU, one thread each, and wait for all; a rank that fails raises with its output."""
    port, processes = free_port(), []
    for rank in range(world_size):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", module, "--child", *child_args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=Path(__file__).parent.parent,
            )
        )
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        if process.returncode != 0:
            raise RuntimeError(f"{module} rank {rank} failed:\n{output[-3000:]}")


def timed_steps(trainer: Any, samples: list, steps: int) -> list[float]:
    """In a rank: one warm-up `train_step`, then `steps` timed ones, each from a barrier to a
    barrier, so a step's time is the slowest rank's."""
    import torch.distributed as dist

    trainer.train_step(samples)  # warm-up (allocates the optimizer state)
    seconds = []
    for _ in range(steps):
        dist.barrier()
        started = time.perf_counter()
        trainer.train_step(samples)
        dist.barrier()
        seconds.append(time.perf_counter() - started)
    return seconds
