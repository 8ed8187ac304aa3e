"""A Hugging Face ``Trainer`` callback that records the run (see
docs/python.md, "Trainers")::

    from reptrace.integrations.huggingface import ReptraceCallback

    train = train.add_column("reptrace_id", list(range(len(train))))  # or any int ids
    args = TrainingArguments(..., remove_unused_columns=False)
    callback = ReptraceCallback("runs/bert", classes=["neg", "pos"])
    Trainer(model, args, train_dataset=train, callbacks=[callback]).train()

Each example's instance id comes from the ``id_column`` of the batches (popped
before the model sees them, so the model needs no such argument), its label
from ``label_column``. The ``Trainer`` drops columns its model does not take
unless ``remove_unused_columns=False``.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from .._reptrace import InvalidInput
from . import _Recording


class ReptraceCallback(_Recording, TrainerCallback):
    """Records a ``Trainer`` run into ``run_dir``.

    Args:
        run_dir: a new directory for the run.
        classes: class names, indexed by label.
        id_column: the batch key holding each example's instance id
            (an integer, e.g. its index in the training set).
        label_column: the batch key holding each example's label.
        layers, exclude, dtype, compression, torch_threads, name, settings: as
            for :class:`reptrace.Tracer`.
        mode: ``"instance"`` or ``"batch"``; by default instance mode when
            the ``Trainer``'s optimizer is ``torch.optim.SGD``, ``Adam`` or
            ``AdamW`` (``TrainingArguments(optim="sgd")``, the default
            ``"adamw_torch"``, ``"adamw_torch_fused"``), batch mode otherwise.
        probes: ``(inputs, labels)`` (or with ids) to record as probes when
            training ends; probes can also be added later with
            :func:`reptrace.add_probes`.
    """

    def __init__(self, run_dir, *, classes, id_column="reptrace_id", label_column="labels",
                 layers=None, exclude=None, mode=None, dtype="f32", name=None, settings=None,
                 probes=None, compression="zstd", torch_threads="auto"):
        super().__init__(run_dir, classes, layers, mode, dtype, name, settings, probes, exclude,
                         compression, torch_threads)
        self.id_column = id_column
        self.label_column = label_column
        self._accumulation = 1
        self._hooks = []

    # ------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       lr_scheduler=None, **kwargs):
        if args.remove_unused_columns:
            raise InvalidInput(
                f"ReptraceCallback: the Trainer drops the {self.id_column!r} column before "
                "the model sees it; set TrainingArguments(remove_unused_columns=False)"
            )
        # The Trainer hands an accelerate-wrapped optimizer; its torch optimizer steps.
        inner = getattr(optimizer, "optimizer", optimizer)
        self._accumulation = int(args.gradient_accumulation_steps)
        self._follow(model, inner, lr_scheduler, {
            "trainer": "transformers.Trainer",
            "gradient_accumulation_steps": self._accumulation,
            "max_grad_norm": float(args.max_grad_norm or 0.0),
        })
        self._hooks = [
            model.register_forward_pre_hook(self._take_ids, with_kwargs=True),
            model.register_forward_hook(self._tell_batch, with_kwargs=True),
        ]

    def on_step_end(self, args, state, control, **kwargs):
        # Micro-batches still untold of to a step: the optimizer skipped it.
        self.tracer.skipped()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.tracer.end_epoch()

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._finish()

    # ------------------------------------------------------------ model hooks

    def _take_ids(self, module, args, kwargs):
        ids = kwargs.pop(self.id_column, None)
        if not (module.training and torch.is_grad_enabled()):
            return args, kwargs
        if ids is None:
            raise InvalidInput(
                f"ReptraceCallback: the batch has no {self.id_column!r} column (give the "
                "training set an integer id column, or name it with id_column=...)"
            )
        labels = kwargs.get(self.label_column)
        if labels is None:
            raise InvalidInput(
                f"ReptraceCallback: the batch has no {self.label_column!r} column "
                "(name the labels with label_column=...)"
            )
        self._batch = (ids, labels)
        return args, kwargs

    def _tell_batch(self, module, args, kwargs, output):
        batch = getattr(self, "_batch", None)
        if batch is None:
            return
        self._batch = None
        loss = _field(output, "loss")
        if loss is not None:
            loss = loss.detach() / self._accumulation
        self.tracer.batch(*batch, loss=loss, logits=_field(output, "logits"))


def _field(output, key):
    """``output[key]`` of a model output (a ``ModelOutput``, a dict or a
    tuple whose first item is the loss), or None."""
    if isinstance(output, dict):
        return output.get(key)
    value = getattr(output, key, None)
    return value if isinstance(value, torch.Tensor) else None
