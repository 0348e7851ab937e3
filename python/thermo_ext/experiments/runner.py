"""Many runs: one after another in this process, or spread over worker processes.

Progress goes to stderr: a tqdm bar per run on a terminal; when stderr is not a terminal (a log
file, a pipe, CI) plain lines instead, one per finished run and a status line at most every
``STATUS_EVERY_S`` seconds, so that logs hold no carriage returns or escape codes.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import multiprocessing
import os
import queue as queue_module
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

import torch

from .machine import available_cores
from .training import RunSpec, train_run

__all__ = ["run_many", "default_jobs", "STATUS_EVERY_S"]

#: Seconds between two status lines of the plain (not a terminal) progress report.
STATUS_EVERY_S = 30.0


# ============================================================================ progress reports
def _outcome(res: Dict[str, Any]) -> str:
    return (f"test acc {res['final_test_acc']:5.1f}%"
            + (f", diverged at epoch {res['diverged_at']}" if res["diverged_at"] else ""))


class _Silent:
    def started(self, i: int) -> None:
        pass

    def advanced(self, i: int, epoch: int) -> None:
        pass

    def finished(self, i: int, res: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Bars(_Silent):
    """One tqdm bar per run (on a terminal)."""

    def __init__(self, specs: Sequence[RunSpec], stream: TextIO):
        self.specs, self.stream = specs, stream
        self.bars: Dict[int, Any] = {}

    def _bar(self, i: int):
        if i not in self.bars:
            from tqdm.auto import tqdm

            self.bars[i] = tqdm(total=self.specs[i].epochs, desc=f"{self.specs[i].label:<22}",
                                unit="ep", leave=True, dynamic_ncols=True, file=self.stream)
        return self.bars[i]

    def started(self, i: int) -> None:
        self._bar(i)

    def advanced(self, i: int, epoch: int) -> None:
        b = self._bar(i)
        if epoch > b.n:
            b.update(epoch - b.n)

    def finished(self, i: int, res: Dict[str, Any]) -> None:
        b = self._bar(i)
        b.set_postfix_str(_outcome(res), refresh=False)
        b.update(self.specs[i].epochs - b.n)
        b.close()

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


class _Lines(_Silent):
    """Plain lines (stderr is not a terminal): one per finished run, and a status line of the
    runs in progress at most every ``every`` seconds."""

    def __init__(self, specs: Sequence[RunSpec], stream: TextIO, every: float):
        self.specs, self.stream, self.every = specs, stream, every
        self.t0 = self.last = time.monotonic()
        self.running: Dict[int, int] = {}  # run index -> last epoch reported
        self.finished_runs: set = set()  # a worker's last messages may arrive after its result
        self.done = 0

    def _print(self, text: str) -> None:
        self.last = time.monotonic()
        print(f"[{self.last - self.t0:6.1f} s] {text}", file=self.stream, flush=True)

    def started(self, i: int) -> None:
        if i not in self.finished_runs:
            self.running.setdefault(i, 0)

    def advanced(self, i: int, epoch: int) -> None:
        if i in self.finished_runs:
            return
        self.running[i] = max(epoch, self.running.get(i, 0))
        if time.monotonic() - self.last >= self.every:
            busy = ", ".join(f"{self.specs[k].label} epoch {e}/{self.specs[k].epochs}"
                             for k, e in sorted(self.running.items()))
            self._print(f"{self.done}/{len(self.specs)} runs done; running: {busy}")

    def finished(self, i: int, res: Dict[str, Any]) -> None:
        self.running.pop(i, None)
        self.finished_runs.add(i)
        self.done += 1
        self._print(f"{self.done}/{len(self.specs)} {self.specs[i].label}: {_outcome(res)}")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _reporter(specs: Sequence[RunSpec], quiet: bool, stream: Optional[TextIO] = None):
    stream = sys.stderr if stream is None else stream
    if quiet:
        return _Silent()
    if _is_terminal(stream):
        return _Bars(specs, stream)
    return _Lines(specs, stream, STATUS_EVERY_S)


# ============================================================================ workers
_progress_queue = None  # set in worker processes by _worker_init


def _worker_init(threads: int, progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    torch.set_num_threads(threads)


def _execute(spec, progress) -> Dict[str, Any]:
    """A spec with its own ``execute(progress)`` (e.g. an mnist1d run) runs that; a
    :class:`RunSpec` runs :func:`train_run`."""
    run = getattr(spec, "execute", None)
    return run(progress) if run is not None else train_run(spec, progress)


def _worker_run(index: int, spec: RunSpec) -> Dict[str, Any]:
    q = _progress_queue
    if q is not None:
        q.put((index, 0))
    return _execute(spec, None if q is None else (lambda e: q.put((index, e))))


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_jobs() -> int:
    """Worker processes: one per available core, at most 2 by default (the target machine)."""
    return max(1, min(2, available_cores()))


def run_many(specs: Sequence[RunSpec], *, jobs: int = 1, threads: int = 1,
             quiet: bool = False) -> List[Dict[str, Any]]:
    """Runs every spec (a :class:`RunSpec`, or any picklable object with ``label``, ``epochs``
    and ``execute(progress)`` returning a record with ``final_test_acc`` and ``diverged_at``);
    returns their records in the order given.

    ``jobs`` > 1 runs them in that many worker processes (spawned, each with ``threads`` torch
    and OpenMP threads: the tiny matmuls are fastest single-threaded, and two single-threaded
    runs use two cores better than one run on two threads). Progress goes to stderr (see the
    module's docstring) unless ``quiet``.
    """
    results: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    report = _reporter(specs, quiet)

    def finish(i: int, res: Dict[str, Any]) -> None:
        report.finished(i, res)
        results[i] = res

    try:
        if jobs <= 1 or len(specs) <= 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for i, spec in enumerate(specs):
                    report.started(i)
                    finish(i, _execute(spec, lambda e, i=i: report.advanced(i, e)))
            finally:
                torch.set_num_threads(previous)
            return results  # type: ignore[return-value]

        ctx = multiprocessing.get_context("spawn")  # fork after OpenMP/torch threads is unsafe
        progress_queue = ctx.Queue()
        # The engine's OpenMP runtime reads OMP_NUM_THREADS when the worker loads it.
        with _env(OMP_NUM_THREADS=threads), futures.ProcessPoolExecutor(
                max_workers=min(jobs, len(specs)), mp_context=ctx, initializer=_worker_init,
                initargs=(threads, progress_queue)) as pool:
            pending = {pool.submit(_worker_run, i, s): i for i, s in enumerate(specs)}
            try:
                while pending:
                    done, _ = futures.wait(pending, timeout=0.2,
                                           return_when=futures.FIRST_COMPLETED)
                    _drain(progress_queue, report)
                    for f in done:
                        finish(pending.pop(f), f.result())
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        return results  # type: ignore[return-value]
    finally:
        report.close()


def _drain(progress_queue, report) -> None:
    while True:
        try:
            i, epoch = progress_queue.get_nowait()
        except queue_module.Empty:
            return
        if epoch == 0:
            report.started(i)
        else:
            report.advanced(i, epoch)
