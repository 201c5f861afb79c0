"""Several processes on one run: the shard of this process under `accelerate launch` / `torchrun`, the gloo group
its ranks agree through, and local processes started by rece itself (`--num-processes`)."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from datetime import timedelta

from .errors import ReceError

BARRIER_TIMEOUT = timedelta(days=7)  # ranks wait for the slowest one at the end of a run
PROCESSES_PER_UNIT = 4  # beyond this many processes per CPU core (or per GPU) a count is a mistake, refused


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compute_units(device: str | None) -> tuple[int, str]:
    """(how many, what) the local processes of a run share: CUDA devices for a cuda run (one for a numbered
    device), else CPU cores."""
    import torch

    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if cuda and torch.cuda.is_available():
        count = 1 if ":" in str(device or "") else torch.cuda.device_count()
        return max(count, 1), "CUDA device(s)"
    return cpu_cores(), "CPU core(s)"


def local_processes(requested: int, rows: int, device: str | None) -> int:
    """The local processes to start for `requested` (--num-processes) on `rows` prompt rows: at most one per row;
    a warning when they outnumber the devices or cores they share, a ReceError when far beyond them."""
    if requested < 1:
        raise ReceError(f"--num-processes must be at least 1 (got {requested})")
    units, what = compute_units(device)
    limit = PROCESSES_PER_UNIT * units
    if requested > limit:
        raise ReceError(
            f"--num-processes {requested} is far more than this machine's {units} {what}; "
            f"use at most {limit} (one per {what.split('(')[0].strip()} is usually fastest: --num-processes {units})"
        )
    processes = min(requested, max(rows, 1))  # a process with no row would only load the model
    if processes > units:
        warnings.warn(
            f"{processes} processes share {units} {what}: each loads the model and they compete for it; "
            f"--num-processes {units} is usually faster",
            stacklevel=3,
        )
    return processes


def launcher_shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) from RANK/WORLD_SIZE/LOCAL_RANK as set by accelerate launch or torchrun."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or env.get("LOCAL_RANK") or 0)
        local = int(env.get("LOCAL_RANK") or rank)
    except ValueError:
        raise ReceError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer; launch with accelerate launch or torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ReceError(f"RANK {rank} is not within WORLD_SIZE {world}; launch with accelerate launch or torchrun")
    return rank, world, local


def is_secondary_rank() -> bool:
    """Whether this process is a rank other than 0 of a launched run (rank 0 alone reports)."""
    return os.environ.get("RANK", "0") not in ("", "0")


def all_ranks_ok(error: str | None, dist_on: bool) -> None:
    """Raise the first rank's error on every rank (a collective when distributed)."""
    if dist_on:
        import torch.distributed as dist

        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise ReceError(error)


def init_distributed(world: int, rank: int) -> bool:
    """Join the process group of a launched run (gloo); return True when this call created it."""
    import torch.distributed as dist

    if world == 1 or dist.is_initialized():
        return False
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise ReceError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not; launch with accelerate launch or torchrun")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, entry: Callable, job, errors) -> None:
    """A process started by `spawn`: `entry(job, rank, world, local_rank)`; a ReceError goes to the parent."""
    from .console import quiet_libraries

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    quiet_libraries()
    try:
        entry(job, rank, world, rank)
    except ReceError as exc:
        errors.put(str(exc))
        raise SystemExit(2) from None


def spawn(entry: Callable, job, processes: int, watch: Callable[[], None] = lambda: None) -> None:
    """Run `entry(job, rank, world, local_rank)` in `processes` spawned local processes, calling `watch()` every
    second until they end; the first ReceError of a worker is raised here, Ctrl-C stops them all."""
    import logging

    import torch.multiprocessing as mp

    errors = mp.get_context("spawn").SimpleQueue()
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")  # it warns when it stops the other workers
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    context = mp.start_processes(
        _worker, args=(processes, _free_port(), entry, job, errors), nprocs=processes, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=1.0, grace_period=10.0):
            watch()
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        if not errors.empty():
            raise ReceError(errors.get()) from None
        raise
    except KeyboardInterrupt:
        for process in context.processes:
            process.terminate()
        raise
    finally:
        spawn_log.setLevel(level)
