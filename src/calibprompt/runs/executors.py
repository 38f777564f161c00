"""Where independent units of work run: one after another in this process (``serial``, the
default, no dependency), or as Ray tasks (``ray``) -- on a local Ray started on demand, or on an
existing cluster (``address``).

A unit is a plain function and its arguments (picklable: run configs, image positions), and
everything it computes is seeded by the unit's own content (a run's seed, an image's hash), never
by the worker that runs it -- so a unit's result is the same on any executor. Ray retries a unit
whose worker died (``max_retries``); a unit that fails with an error of its own is not retried:
the other units finish, then the first error is raised. What units write goes through the run
machinery's atomic files and checkpoints, so a sweep started again skips what finished.

Several machines: every worker must reach the same ``--out`` and ``--cache`` directories (shared
storage mounted at the same path, e.g. NFS) and have calibprompt installed with the same
versions. Features are not shipped through Ray's object store: the content-addressed cache is
what makes a second sweep over the same images free, and several processes may write it at once
(every shard is written atomically under a unique name; an image encoded twice is stored twice and
read once).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from calibprompt.progress import unit_progress
from calibprompt.runs.common import option

__all__ = ["EXECUTORS", "ExecutorOptions", "check_executor", "chunks", "gpu_share", "map_units"]

#: The executors: ``serial`` (this process, in order) and ``ray`` (Ray tasks).
EXECUTORS = ("serial", "ray")
#: How often Ray retries a unit whose worker process died.
MAX_RETRIES = 2


@dataclass(frozen=True)
class ExecutorOptions:
    """Where a command's independent units run (the ``--executor``/``--address``/``--ray-workers``
    flags of ``sweep`` and ``certify``); none of them changes a result."""

    executor: str = option("serial", help="where the independent units (run groups, images) run: serial (this "
                                          "process) or ray (Ray tasks; needs calibprompt[ray]; the same results)",
                           choices=EXECUTORS)
    address: str | None = option(None, help="--executor ray: an existing Ray cluster ('auto', 'ray://HOST:10001'); "
                                            "every node needs calibprompt and the same data, --out and --cache paths "
                                            "(shared storage)", default_text="a local Ray started for the command")
    ray_workers: int | None = option(None, help="--executor ray without --address: worker processes of the local Ray",
                                     metavar="N", default_text="the CPUs")


def check_executor(executor: str, address: str | None, workers: int | None) -> None:
    """Refuse an unknown executor, options of another executor, and Ray when it is not installed
    (before any work)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"ray_workers: expected a positive number of worker processes, got {workers!r}")
    if executor == "serial" and (address is not None or workers is not None):
        raise ValueError("--address/--ray-workers apply to --executor ray")
    if address is not None and workers is not None:
        raise ValueError("--ray-workers sets the workers of a local Ray; with --address the cluster has its own")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ValueError("--executor ray needs Ray: pip install 'calibprompt[ray]'") from exc


def map_units(fn: Callable[..., Any], units: Sequence[tuple[Any, ...]], executor: str = "serial", *,
              address: str | None = None, workers: int | None = None,
              on_done: Callable[[int, Any], None] | None = None, description: str = "units",
              progress: bool = True, gpus: float = 0.0) -> list[Any]:
    """``[fn(*unit) for unit in units]`` on ``executor``; ``on_done(i, result)`` is called in this
    process as each unit finishes (in order for ``serial``, as they come for ``ray``). The progress
    display counts units done / running / failed.

    ``ray``: a local Ray with ``workers`` worker processes (default: the CPUs) unless Ray is
    already initialised or ``address`` names a cluster (``"auto"``, ``"ray://host:10001"``); a Ray
    started here is shut down at the end. Each task gets one CPU and sets torch's threads to the
    CPUs per worker; with ``gpus`` (units on ``--device cuda``) each task also asks Ray for that
    share of a GPU -- Ray hides the GPUs from tasks that do not ask -- and sees its GPU as ``cuda``."""
    check_executor(executor, address, workers)
    if executor == "serial":
        results = []
        with unit_progress(progress, description, len(units)) as display:
            for i, unit in enumerate(units):
                display.update(running=1)
                try:
                    result = fn(*unit)
                except BaseException:
                    display.update(running=0, failed=1)
                    raise
                display.update(done=1, running=0)
                results.append(result)
                if on_done is not None:
                    on_done(i, result)
        return results
    return _ray_map(fn, units, address, workers, on_done, description, progress, gpus)


def _call(fn: Callable[..., Any], unit: tuple[Any, ...], threads: int) -> Any:
    """A unit inside a Ray worker: torch limited to the worker's share of the CPUs."""
    import torch

    torch.set_num_threads(threads)
    return fn(*unit)


def _ray_map(fn: Callable[..., Any], units: Sequence[tuple[Any, ...]], address: str | None, workers: int | None,
             on_done: Callable[[int, Any], None] | None, description: str, progress: bool,
             gpus: float) -> list[Any]:
    import ray
    from ray.exceptions import RayError, RayTaskError

    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
        if address is not None:
            options["address"] = address
        else:
            options["num_cpus"] = workers or os.cpu_count() or 1
        ray.init(**options)
    try:
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = max(1, (os.cpu_count() or 1) // slots) if address is None else 1
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False)(_call)
        refs = {task.remote(fn, unit, threads): i for i, unit in enumerate(units)}
        results: list[Any] = [None] * len(units)
        failures: list[tuple[int, BaseException]] = []
        pending = list(refs)
        with unit_progress(progress, description, len(units)) as display:
            display.update(running=min(slots, len(pending)))
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    i = refs[ref]
                    try:
                        results[i] = ray.get(ref)
                    except RayTaskError as exc:  # the unit's own error: its original exception
                        failures.append((i, exc.cause if isinstance(exc.cause, BaseException) else exc))
                        display.update(failed=1)
                        continue
                    except RayError as exc:  # the worker died more often than it is retried
                        failures.append((i, exc))
                        display.update(failed=1)
                        continue
                    display.update(done=1)
                    if on_done is not None:
                        on_done(i, results[i])
                display.update(running=min(slots, len(pending)))
        if failures:
            i, error = failures[0]
            if len(failures) > 1 and isinstance(error, Exception):
                error.add_note(f"({len(failures)} of {len(units)} units failed; the others finished)")
            raise error
        return results
    finally:
        if started:
            ray.shutdown()


def gpu_share(device: str) -> float:
    """The share of a GPU a Ray task of a run on ``device`` asks for: one GPU for CUDA, none else."""
    return 1.0 if str(device).startswith("cuda") else 0.0


def chunks(items: Sequence[Any], pieces: int) -> list[list[Any]]:
    """``items`` cut into at most ``pieces`` consecutive chunks of near-equal size."""
    if not items:
        return []
    size = math.ceil(len(items) / max(1, pieces))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
