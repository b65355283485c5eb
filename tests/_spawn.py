"""Spawning gloo worlds for the distributed tests: a free local port and the process launch."""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 30.0) -> None:
    """Join the gloo world on 127.0.0.1; a collective that some rank never reaches fails after
    ``timeout_s`` instead of hanging the suite."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


# What the ranks import, imported once by the fork server they are forked from (names of
# installed modules: the fork server does not see this process's ``sys.path`` additions, and
# skips what it cannot import, e.g. transformers where it is not installed).
PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.tensor.parallel",
           "torch.distributed.fsdp", "transformers.models.llama.modeling_llama",
           "leanloss", "leanloss.integrations.transformers"]


def spawn(child, world: int, *args) -> None:
    """Run ``child(rank, world, port, *args)`` in ``world`` processes and wait for them.

    The ranks are forked from multiprocessing's fork server, a single-threaded process that
    imported :data:`PRELOAD` once per test session (safe whatever threads this process runs; a
    fresh interpreter per rank would import torch again, seconds per rank).
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(child, args=(world, free_port(), *args), nprocs=world, join=True,
                       start_method="forkserver")


@contextlib.contextmanager
def logged_all_reduce():
    """Record the number of elements of every ``dist.all_reduce`` inside the block (a list,
    yielded): what the communication-volume checks read."""
    sizes: list = []
    original = dist.all_reduce

    def logged(t, *args, **kwargs):
        sizes.append(t.numel())
        return original(t, *args, **kwargs)

    dist.all_reduce = logged
    try:
        yield sizes
    finally:
        dist.all_reduce = original


def run_cases(rank: int, world: int, port: int, inputs: str, out_dir: str, run_case) -> None:
    """A rank of a case-table test (``spawn(run_cases, world, inputs, out_dir, run_case)``):
    joins the gloo world, runs ``run_case(case, rank)`` on every case of the ``inputs`` file
    (a dict saved with ``torch.save``) and saves ``{name: result}`` to ``out_dir/rank{rank}.pt``.
    A case that raises is recorded as ``{"error": ...}`` and ends the run (the ranks'
    collectives would no longer pair up)."""
    init_gloo(rank, world, port)
    try:
        torch.set_num_threads(1)
        results = {}
        for name, case in torch.load(inputs, weights_only=False).items():
            try:
                results[name] = run_case(case, rank)
            except Exception as exc:  # reported by the parent
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                break
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
