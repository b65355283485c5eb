"""Spawning gloo worlds for the distributed tests: a free local port, the process launch, and
:func:`run_ranks`, the round trip most tests make (inputs to every rank, each rank's results
back to the parent)."""
from __future__ import annotations

import contextlib
import datetime
import functools
import multiprocessing
import os
import socket
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a spawned gloo world, or torchrun's master port)."""
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


def close_gloo(completed: bool = True) -> None:
    """Leave the gloo world at the end of a spawned rank.

    torch < 2.7 can deadlock destroying a gloo process group: its destructor waits, holding the
    GIL, for a mutex that gloo's worker thread holds while it waits for the GIL to free the last
    collective's tensors (seen on 2.6 in ``~ProcessGroupGloo``). There a rank that completed its
    work meets the others at a barrier and leaves the group to the process exit (the spawned
    ranks end in ``os._exit``, which frees everything); newer torch destroys it."""
    if torch.__version__ < (2, 7):
        if completed:
            dist.barrier()
        return
    dist.destroy_process_group()


def _run_rank(rank: int, world: int, port: int, work: Callable, inputs_path: str, out_dir: str,
              timeout_s: float) -> None:
    init_gloo(rank, world, port, timeout_s)
    completed = False
    try:
        torch.set_num_threads(1)
        results = work(rank, world, torch.load(inputs_path, weights_only=False))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        completed = True
    finally:
        close_gloo(completed)


def run_ranks(work: Callable[[int, int, Any], Any], world: int, inputs: Any, out_dir,
              timeout_s: float = 30.0) -> List[Any]:
    """Run ``work(rank, world, inputs)`` on every rank of a gloo world of ``world`` processes (one
    intra-op thread each) and return the ranks' results, in rank order. ``work`` is a module-level
    function; ``inputs`` and the results travel through files in ``out_dir``."""
    inputs_path = os.path.join(out_dir, "inputs.pt")
    torch.save(inputs, inputs_path)
    spawn(_run_rank, world, work, inputs_path, str(out_dir), timeout_s)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]


def _run_case_table(rank: int, world: int, cases: dict,
                    run_case: Callable[[Any, int], Any]) -> Tuple[dict, Optional[str]]:
    results = {}
    for name, case in cases.items():
        try:
            results[name] = run_case(case, rank)
        except Exception as exc:  # reported by the parent
            return results, f"case {name!r} on rank {rank}: {type(exc).__name__}: {exc}"
    return results, None


def run_cases(run_case: Callable[[Any, int], Any], world: int, cases: dict, out_dir,
              timeout_s: float = 30.0) -> List[dict]:
    """:func:`run_ranks` of a case table: every rank runs ``run_case(case, rank)`` (module-level)
    on each case of the dict ``cases``; returns each rank's ``{name: result}``. The first case
    that raises ends that rank's run (the ranks' collectives would no longer pair up) and fails
    the caller with its error."""
    work = functools.partial(_run_case_table, run_case=run_case)
    outcomes = run_ranks(work, world, cases, out_dir, timeout_s)
    errors = [error for _, error in outcomes if error is not None]
    assert not errors, "\n".join(errors)
    return [results for results, _ in outcomes]


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
