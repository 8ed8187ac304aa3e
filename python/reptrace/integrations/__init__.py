"""Recording inside the trainers people use, as callbacks.

- :mod:`reptrace.integrations.huggingface`: ``ReptraceCallback``, a
  ``transformers.TrainerCallback`` for the Hugging Face ``Trainer``;
- :mod:`reptrace.integrations.lightning`: ``ReptraceCallback``, a
  ``lightning.pytorch.Callback`` for a ``LightningModule``.

Each imports its trainer only when imported itself: recording a plain
PyTorch loop needs neither. Both build a :class:`reptrace.Tracer` on the
trainer's model and optimizer when training starts and let it follow the
optimizer (:meth:`reptrace.Tracer.follow_optimizer`), so clipping, gradient
accumulation and the scheduler the trainer runs are recorded as they
happen; instance mode when the optimizer is ``torch.optim.SGD``, ``Adam`` or
``AdamW`` (the Hugging Face default, also its fused variant), batch mode
otherwise.
"""


class _Recording:
    """What both callbacks hold: the run's options, and the tracer they
    build when training starts."""

    def __init__(self, run_dir, classes, layers, mode, dtype, name, settings, probes,
                 exclude=None, compression="zstd", torch_threads="auto"):
        self.run_dir = run_dir
        self.compression = compression
        self.torch_threads = torch_threads
        self.classes = classes
        self.layers = layers
        self.exclude = exclude
        self.mode = mode
        self.dtype = dtype
        self.name = name
        self.settings = dict(settings or {})
        self.probes = probes
        self.tracer = None
        self.manifest: dict | None = None

    def _follow(self, model, optimizer, scheduler, trainer_settings: dict):
        """A Tracer on ``model`` and ``optimizer`` that follows the
        optimizer: instance mode for ``torch.optim.SGD``, ``Adam`` and
        ``AdamW`` unless ``mode`` says otherwise, batch mode for any other
        optimizer."""
        import torch

        from .._torch import Tracer

        traced = (torch.optim.SGD, torch.optim.Adam)  # AdamW is an Adam
        mode = self.mode or ("instance" if isinstance(optimizer, traced) else "batch")
        self.tracer = Tracer(model, optimizer, self.run_dir, classes=self.classes,
                             layers=self.layers, exclude=self.exclude, mode=mode,
                             dtype=self.dtype, compression=self.compression,
                             torch_threads=self.torch_threads,
                             scheduler=scheduler, name=self.name,
                             settings={**trainer_settings, **self.settings})
        self.tracer.follow_optimizer()

    def _finish(self) -> None:
        self.manifest = self.tracer.finish(self.probes)
