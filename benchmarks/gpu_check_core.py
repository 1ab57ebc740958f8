"""What a GPU check is, and how a list of them runs: a budget, a time limit, and a result for every check.

A :class:`Check` is a function ``run(ctx, outcome)`` that measures something and judges it through
``outcome`` (:meth:`Outcome.within` against a tolerance, :meth:`Outcome.require` for a yes/no). Raising
:class:`Skip` says why it cannot run here. :func:`run_checks` runs them in order and never lets one stop
the others: a check that raises is an ``error`` with its traceback, one that runs past the time left is
stopped (``error``), and one whose estimate no longer fits the budget is not started (``skipped``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("pass", "fail", "error", "skipped")


class Skip(Exception):
    """Raised by a check that cannot run on this machine; the message is the reason, shown in the report."""


class CheckTimeout(Exception):
    """Raised inside a check that outlives the time it was given."""


@dataclass
class Context:
    """What every check needs to know about this run.

    Attributes:
        device: ``"cuda"`` or ``"cpu"`` (the dry run).
        dry_run: tiny random models on the CPU.
        model: what ``benchmarks.cases.load_model`` builds: ``smollm2-135m-random``, ``tiny-llama``, an alias
            of :mod:`fam_hf.assets` or a local folder.
        model_note: what the report says about that choice (why random weights, say).
        real_weights: whether ``model`` holds trained weights.
        batch_size, seq_len: the numeric checks' batch (random token ids; labels = inputs).
        repeats, warmup: interleaved timing rounds and warm-up steps per variant.
        deadline: ``time.monotonic()`` after which no check runs.
        overrides: tolerances from the command line, ``{"check.key": value}``.
        workdir: a scratch folder for output dirs and saved models.
    """

    device: str
    dry_run: bool
    model: str
    model_note: str
    real_weights: bool
    batch_size: int
    seq_len: int
    repeats: int
    warmup: int
    deadline: float
    overrides: dict[str, float] = field(default_factory=dict)
    workdir: Path = Path(".")

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()


@dataclass
class Criterion:
    """One judged number: ``value ≤ limit`` (``limit`` None: a yes/no, ``value`` is the answer)."""

    key: str
    label: str
    value: Any
    limit: float | None
    ok: bool


class Outcome:
    """What a check measured (``values``) and how it was judged (``criteria``); kept even if the check raises."""

    def __init__(self, check: str, overrides: dict[str, float] | None = None) -> None:
        self.check = check
        self.overrides = overrides or {}
        self.criteria: list[Criterion] = []
        self.values: dict[str, Any] = {}
        self.notes: list[str] = []

    def within(self, key: str, label: str, value: float, tolerance: float) -> bool:
        """Judge ``value ≤ tolerance`` (``--tolerance CHECK.KEY=X`` replaces ``tolerance``); NaN fails."""
        limit = float(self.overrides.get(f"{self.check}.{key}", tolerance))
        value = float(value)
        ok = math.isfinite(value) and value <= limit
        self.criteria.append(Criterion(key, label, value, limit, ok))
        return ok

    def require(self, key: str, label: str, ok: bool, value: Any = None) -> bool:
        """A yes/no criterion; ``value`` is shown beside it (defaults to ``ok``)."""
        self.criteria.append(Criterion(key, label, ok if value is None else value, None, bool(ok)))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return bool(self.criteria) and all(c.ok for c in self.criteria)

    def as_dict(self) -> dict[str, Any]:
        return {
            "criteria": [c.__dict__ for c in self.criteria],
            "values": self.values,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Check:
    """One verification.

    Attributes:
        name: id (``--only``, ``--tolerance NAME.KEY=X``, the report).
        group: ``precision``, ``kernels``, ``k-bit``, ``distributed`` or ``speed``.
        compares: what is compared against what, in a sentence (the report's column).
        run: ``run(ctx, outcome)``; judges through ``outcome``, raises :class:`Skip` where it cannot run.
        estimate_s: ``(on a GPU, in the dry run)`` seconds it is expected to take; it is not started when less
            than that is left of the budget.
    """

    name: str
    group: str
    compares: str
    run: Callable[[Context, Outcome], None]
    estimate_s: tuple[float, float] = (30.0, 5.0)

    def estimate(self, ctx: Context) -> float:
        return self.estimate_s[1] if ctx.dry_run else self.estimate_s[0]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CheckTimeout` in the block after ``seconds`` (main thread only; elsewhere no limit).

    A signal interrupts Python code between bytecodes, so a long CUDA kernel finishes first; the checks'
    kernels take milliseconds.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout(f"stopped after {seconds:.0f} s: the time left of --budget-s ran out")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_checks(
    checks: list[Check], ctx: Context, on_result: Callable[[list[dict]], None] | None = None
) -> list[dict[str, Any]]:
    """Run ``checks`` in order; one result per check, whatever happens in it.

    Returns:
        Dicts with ``name``, ``group``, ``compares``, ``status`` (one of :data:`STATUSES`), ``seconds``,
        ``criteria``, ``values``, ``notes``, and ``reason`` (skipped) or ``error`` + ``traceback`` (error).
        ``on_result(results_so_far)`` is called after each, so a report survives a run that is killed later.
    """
    results: list[dict[str, Any]] = []
    for check in checks:
        result: dict[str, Any] = {"name": check.name, "group": check.group, "compares": check.compares}
        outcome = Outcome(check.name, ctx.overrides)
        start, left, estimate = time.monotonic(), ctx.remaining(), check.estimate(ctx)
        if left < estimate:
            result.update(status="skipped", reason=f"budget: {max(left, 0):.0f} s left of --budget-s, this check "
                                                   f"takes ~{estimate:.0f} s")  # fmt: skip
        else:
            try:
                with time_limit(left):
                    check.run(ctx, outcome)
                if outcome.criteria:
                    result["status"] = "pass" if outcome.ok else "fail"
                else:  # a check that judged nothing has not checked anything
                    result.update(status="error", error="the check recorded no criterion")
            except Skip as why:
                result.update(status="skipped", reason=str(why))
            except Exception as error:  # noqa: BLE001 - one broken check must not stop the others
                result.update(status="error", error=f"{type(error).__name__}: {error}",
                              traceback=traceback.format_exc()[-6000:])  # fmt: skip
            finally:
                _release_memory(ctx)
        result.update(outcome.as_dict())
        result["seconds"] = round(time.monotonic() - start, 2)
        results.append(result)
        if on_result is not None:
            on_result(results)
    return results


def _release_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()
