"""What :class:`~fam_hf.trainer.FAMMixin` and :class:`~fam_hf.sam_trainer.SAMMixin` share.

Both are mixins that go in *front* of any ``transformers.Trainer`` subclass (``FAMTrainer = FAMMixin +
Trainer``; ``fam_hf.trl.FAMSFTTrainer = FAMMixin + trl.SFTTrainer``). This module holds the pieces they have
in common: the check that a mixin sits where its overrides run (:func:`check_mixin_order`), what ``args=None``
or a plain config becomes (:func:`adopt_args`), the check of ``args`` (:func:`check_args`), the
sequence-classifier loss-kwargs fix (:func:`fix_sequence_classifier_loss`) and metrics summed on the device between logs, by name (:class:`MetricSums`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .head_loss import head_loss_for

logger = logging.getLogger(__name__)


def check_mixin_order(cls: type, mixin: type) -> None:
    """Raise TypeError when a ``Trainer`` subclass comes before ``mixin`` in ``cls``'s MRO.

    Such a class (``class X(SFTTrainer, FAMMixin)``) would run the other trainer's ``compute_loss`` /
    ``training_step`` without calling the mixin's: the method would be silently off.
    """
    if not issubclass(cls, Trainer):
        return  # a mixin of mixins; checked when it meets a Trainer
    mro = cls.__mro__
    ahead = [c for c in mro[: mro.index(mixin)] if issubclass(c, Trainer) and not issubclass(c, mixin)]
    if ahead:
        other = ahead[0].__name__
        raise TypeError(
            f"{cls.__name__} puts {mixin.__name__} after {other} in its bases, so {other}'s compute_loss/training_step "
            f"would run without {mixin.__name__}'s (the method silently off); put the mixin first: "
            f"class {cls.__name__}({mixin.__name__}, {other})"
        )


def adopt_args(
    trainer: type[Trainer],
    config_class: type[TrainingArguments] | None,
    call: tuple[tuple, dict[str, Any]],
    default_output_dir: Callable[[Any], str],
    prefix: str,
) -> tuple[tuple, dict[str, Any]]:
    """The trainer's ``(args, kwargs)`` with ``args=`` as ``config_class`` takes it, as ``Trainer`` and TRL's trainers
    treat theirs: ``None`` becomes ``config_class(default_output_dir(model))`` and a config of a class that
    ``config_class`` extends (``TrainingArguments`` or ``SFTConfig`` for ``FAMSFTConfig``) is copied field by field,
    so every value the user set survives, with the ``{prefix}_*`` fields at their defaults (logged). Anything else is
    left for :func:`check_args` to refuse. ``args`` is ``Trainer.__init__``'s second parameter (``model, args, …``)."""
    positional, kwargs = call
    if config_class is None:
        return call
    given = positional[1] if len(positional) > 1 else kwargs.get("args")
    if isinstance(given, config_class) or not (given is None or issubclass(config_class, type(given))):
        return call
    if given is None:
        model = positional[0] if positional else kwargs.get("model")
        adopted = config_class(output_dir=default_output_dir(model))
        source = "no args"
    else:
        values = {field.name: getattr(given, field.name) for field in dataclasses.fields(given) if field.init}
        adopted = config_class(**values)
        source = f"args={type(given).__name__}(...)"
    defaults = {name: value for name, value in dataclasses.asdict(adopted).items() if name.startswith(f"{prefix}_")}
    logger.warning(
        "%s was given %s: it trains with %s(...), which keeps every field you set and adds %s; pass "
        "args=%s(...) to choose them",
        trainer.__name__,
        source,
        config_class.__name__,
        ", ".join(f"{name}={value!r}" for name, value in defaults.items() if value is not None) or "its defaults",
        config_class.__name__,
    )
    if len(positional) > 1:
        return (positional[0], adopted, *positional[2:]), kwargs
    return positional, {**kwargs, "args": adopted}


def trainer_output_dir(model) -> str:
    """``output_dir`` of the config built when ``args`` is None: ``Trainer``'s."""
    return "tmp_trainer"


def check_args(trainer: Trainer, fields: type, config_class: type | None, prefix: str) -> None:
    """Raise TypeError unless ``trainer.args`` carries the ``fields`` dataclass (``FAMFields``, ``SAMFields``)."""
    if not isinstance(trainer.args, fields):
        given = type(trainer.args).__name__
        wanted = f"args={config_class.__name__}(...)" if config_class else f"args with the {prefix}_* fields"
        raise TypeError(
            f"{type(trainer).__name__} needs {wanted}, got {given}; to keep {given}'s own fields, mix the "
            f"{prefix}_* fields into it: @dataclass class MyConfig({fields.__name__}, {given})"
        )


def fix_sequence_classifier_loss(trainer: Trainer, model: torch.nn.Module | None = None) -> None:
    """transformers' sequence classifiers accept ``**kwargs``, so ``Trainer`` believes their loss is summed over
    ``num_items_in_batch``, but they return a per-micro-batch mean: under gradient accumulation the loss (and a
    penalty, or SAM's first-pass gradient) would be k× too large, and ×world_size under DDP token averaging.
    Declaring that the model takes no loss kwargs makes ``Trainer`` average it like any mean loss. ``model``:
    the one about to train, where it is not ``trainer.model`` yet (``model_init``)."""
    head_loss = head_loss_for(trainer.model if model is None else model)
    if head_loss is not None and not head_loss.honours_num_items and trainer.compute_loss_func is None:
        trainer.model_accepts_loss_kwargs = False


class MetricSums:
    """Scalars summed on the device between two logs, by name: no host synchronisation until :meth:`reduce`.

    Args:
        names: the metrics, in the order they are stored.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.total: torch.Tensor | None = None

    def add(self, **values: torch.Tensor) -> None:
        """Add one value per name (0-d tensors, on the device)."""
        row = torch.stack([values[name].detach().reshape(()) for name in self.names])
        self.total = row if self.total is None else self.total + row.to(self.total)

    def reduce(
        self, accelerator, divide: dict[str, float] | None = None, extra: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Each name's sum over the processes, then clears the sums: one collective, which every process must
        reach at the same steps. ``divide`` divides a local sum first; ``extra`` adds host-side values to the
        same reduction. float32 on every process, whatever was added."""
        local = torch.zeros(len(self.names), device=accelerator.device) if self.total is None else self.total.float()
        if divide:
            local = local / torch.tensor([divide.get(n, 1.0) for n in self.names], device=local.device)
        extra = extra or {}
        row = torch.cat([local, torch.tensor(list(extra.values()), device=local.device, dtype=local.dtype)])
        self.total = None
        return dict(zip(self.names + tuple(extra), accelerator.reduce(row, reduction="sum").tolist()))

    def __bool__(self) -> bool:
        return self.total is not None
