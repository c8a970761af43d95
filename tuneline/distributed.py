"""Data parallelism through torchrun: gloo on CPUs, nccl on GPUs.

`train.nproc > 1` makes the train stage start itself again under
`torchrun --standalone --nproc_per_node=N`; starting it under torchrun yourself works too.
Rank 0 alone writes files and talks to MLflow; every rank trains.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    if world() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: float) -> float:
    """Sum a Python number over ranks (float64, so token counts stay exact)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def launch(nproc: int, stage: str) -> int:
    """Run `python -m tuneline.stages STAGE` in `nproc` processes; returns torchrun's exit code."""
    env = dict(os.environ)
    if not torch.cuda.is_available():  # share the CPU cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "tuneline.stages",
        stage,
    ]
    print(f"[{stage}] data parallel over {nproc} processes: {' '.join(cmd[2:])}", flush=True)
    return subprocess.run(cmd, env=env).returncode
