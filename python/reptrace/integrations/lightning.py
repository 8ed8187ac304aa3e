"""A PyTorch Lightning callback that records the run (see docs/python.md,
"Trainers")::

    from reptrace.integrations.lightning import ReptraceCallback

    callback = ReptraceCallback("runs/mine", classes=names)   # batches: (ids, x, y)
    lightning.Trainer(callbacks=[callback], ...).fit(module, loader)

Each training batch gives its instance ids and labels through ``ids`` (a
function of the batch; by default a batch is ``(ids, inputs, labels)``, or a
dict with ``"reptrace_id"`` and ``"labels"``). The step's recorded loss
(``steps.loss``) is the mean cross-entropy of the module's outputs in the
step, so its ``forward`` returns (batch, classes) logits; a module whose
``forward`` returns something else is refused with one line.
"""
from __future__ import annotations

from lightning.pytorch import Callback

from .._reptrace import InvalidInput
from . import _Recording


def _default_ids(batch):
    if isinstance(batch, dict):
        return batch["reptrace_id"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[0], batch[2]
    raise InvalidInput(
        "ReptraceCallback: a batch of neither (ids, inputs, labels) nor a dict with "
        "'reptrace_id' and 'labels'; give ids=lambda batch: (ids, labels)"
    )


class ReptraceCallback(_Recording, Callback):
    """Records the ``fit`` of a ``LightningModule`` into ``run_dir``.

    Args:
        run_dir: a new directory for the run.
        classes: class names, indexed by label.
        ids: ``batch -> (instance ids, labels)``; see the module's text.
        layers, exclude, dtype, compression, torch_threads, name, settings: as
            for :class:`reptrace.Tracer`.
        mode: ``"instance"`` or ``"batch"``; by default instance mode when
            the optimizer is ``torch.optim.SGD``, ``Adam`` or ``AdamW``, batch
            mode otherwise.
        probes: ``(inputs, labels)`` (or with ids) to record as probes when
            training ends.
    """

    def __init__(self, run_dir, *, classes, ids=None, layers=None, exclude=None, mode=None,
                 dtype="f32", name=None, settings=None, probes=None, compression="zstd",
                 torch_threads="auto"):
        super().__init__(run_dir, classes, layers, mode, dtype, name, settings, probes, exclude,
                         compression, torch_threads)
        self.ids = ids or _default_ids

    def on_train_start(self, trainer, pl_module):
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise InvalidInput(
                f"ReptraceCallback: {len(optimizers)} optimizers; one optimizer is traced"
            )
        configs = trainer.lr_scheduler_configs
        self._follow(pl_module, optimizers[0], configs[0].scheduler if configs else None, {
            "trainer": "lightning.Trainer",
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "gradient_clip_val": float(trainer.gradient_clip_val or 0.0),
        })

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids, labels = self.ids(batch)
        self.tracer.batch(ids, labels)

    def on_train_epoch_end(self, trainer, pl_module):
        self.tracer.end_epoch()

    def on_train_end(self, trainer, pl_module):
        self._finish()

    def on_exception(self, trainer, pl_module, exception):
        if self.tracer is not None:
            self.tracer.abort(f"{type(exception).__name__}: {exception}")
