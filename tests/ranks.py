"""Several processes for the parallel tests: ``run_ranks(body, world, *args)`` spawns ``world``
processes joined by torch.distributed's environment (gloo on the CPU, NCCL on GPUs, as
``diffgen.parallel`` picks), runs ``body(rank, results, *args)`` in each, and returns every rank's
``results`` dict. A rank's exception is kept as ``results["error"]`` with its traceback, so the test
process can say what failed where."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, body, world: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    results: dict = {}
    try:
        body(rank, results, *args)
    except Exception as exc:  # noqa: BLE001 - the test process reports it
        results["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(body, world: int, *args) -> list[dict]:
    """``body`` must be a module-level function (spawned processes import it by name)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(body, world, _free_port(), out, args), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
