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
happen; instance mode when the optimizer is ``torch.optim.SGD``, batch mode
otherwise.
"""
