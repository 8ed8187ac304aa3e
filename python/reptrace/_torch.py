"""Recording a PyTorch training loop through the Rust recorder.

The :class:`Tracer` attaches forward hooks to the modules of a traced kind
(``_kinds.py``: Linear, Conv2d, Conv1d, Embedding, LayerNorm, RMSNorm) of
any model. Each time a traced layer runs with gradients, a hook keeps the
layer's input ``a`` and registers a gradient hook on its output, which keeps
``δ = ∂L/∂z`` when ``backward()`` runs; the calls of one forward pass are
positions of one record (a reused module), and several forward/backward
passes before one optimizer step (gradient accumulation) are kept in order.
:meth:`Tracer.step` turns them into the per-example records by each layer's
kind (for Linear ``u = a`` and ``v = −lr·κ·δ``; the full per-example update
where that is smaller, by the format's rule for the kind), checks them against the gradient
the optimizer is about to apply (``.grad``: ``κ`` is the one scalar by which
the two may differ, e.g. clipping by norm or a gradient scaler's scale), and
hands them to the recorder, then calls ``optimizer.step()`` (or
``scaler.step(optimizer)``). Under Adam and AdamW the records hold
``v = −κ·δ`` (no learning rate) and, after the step, each layer's step size
and preconditioner are read from the optimizer's state into ``layer_steps``
and the applied change is checked against them (docs/method.md §6). In
batch mode it records the whole update
``W_{t+1} − W_t`` of each traced layer around the optimizer step instead, for
any optimizer. The hooks only read tensors: training with the tracer attached
is bit-identical to training without it.

Everything about the format, the files and the commits is done in Rust
(``reptrace._reptrace.Recorder``); this module only collects tensors.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _distributed, _kinds, _reptrace
from ._reptrace import InvalidInput, RecordError

# Modules that couple the examples of a batch in training mode: their
# per-example gradients depend on the other members of the batch.
_COUPLING = (nn.modules.batchnorm._BatchNorm,)

_OPTIMIZER_KINDS = {
    torch.optim.SGD: "sgd",
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adamw",
}

# The hyper-parameters of an SGD parameter group that shape a record's
# displacement (docs/method.md §5); weight and bias of a layer must agree on them.
_SHAPING = ("lr", "momentum", "dampening", "nesterov", "maximize")
# Those of an Adam/AdamW group: a layer_steps row holds one lr and β₁ (its
# step size) and, under decoupled decay, one weight decay (the factor d_t
# later updates are shrunk by); β₂, eps and amsgrad are per parameter, in
# the preconditioner D.
_ADAM_SHAPING = ("lr", "beta1", "maximize", "differentiable", "decoupled_weight_decay")


def _adam_kind(optimizer) -> str | None:
    """"adam" or "adamw" for torch.optim.Adam and its subclasses (AdamW, and
    Adam(decoupled_weight_decay=True), are "adamw"), else None."""
    if not isinstance(optimizer, torch.optim.Adam):
        return None
    decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
        g.get("decoupled_weight_decay", False) for g in optimizer.param_groups)
    return "adamw" if decoupled else "adam"


def _group_value(g: dict, k: str):
    if k == "beta1":
        return float(g["betas"][0])
    v = g.get(k)
    return float(v) if isinstance(v, torch.Tensor) else v

# The precision a layer ran in, by the dtype of its output.
_PRECISION = {torch.bfloat16: "bf16", torch.float16: "f16"}

# Relative tolerance of the per-step gradient check, by precision: the
# applied gradient and the records' sum are two summations of the same
# products, in float32, or rounded to the low-precision type (unit roundoff
# 2⁻⁸ for bf16, 2⁻¹¹ for f16) under autocast.
CHECK_TOLERANCE = {"f32": 1e-4, "bf16": 3e-2, "f16": 4e-3}

# κ stays 1 when the relative difference at κ = 1 is within this, or within
# 4 times the difference left by the fitted κ: rounding, not scaling (a loop
# without clipping records what it did before).
_SCALE_SNAP = 1e-6

# CPU tensors take the extension's one-call paths: the check terms of a
# float32 Linear or convolution, the examples' losses, and ids, labels and
# the loss read without a copy (every layer's verdict comes from the
# extension either way). Tests turn it off to run the device path, a GPU's,
# on the CPU.
_ON_HOST = True


def _precision(dtype: torch.dtype) -> str:
    return _PRECISION.get(dtype, "f32")


def _lowest(precisions) -> str:
    order = ["f32", "f16", "bf16"]
    return max(precisions, key=order.index, default="f32")


class _Layer:
    """One traced module and what the current step captured of it: the
    input and output gradient of each of its calls since the last step, and
    the forward pass each call ran in."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.kind = _kinds.of(module)
        self.bias = len(self.kind.params(module)) > 1
        self.spec: dict | None = None  # manifest entry, once shapes are known
        self.group = 0  # index of the optimizer's param group holding the weight
        self.bias_group = 0
        self.inputs: list[torch.Tensor] = []
        self.passes: list[int] = []
        self.dtypes: list[torch.dtype] = []
        self.grads: dict[int, torch.Tensor] = {}
        # Whether each call ran inside backward() (a checkpointed module's
        # recomputation).
        self.recomputed: list[bool] = []
        # The indices of the calls of each forward pass (set by Tracer._passes).
        self.calls: list[list[int]] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias_param(self) -> torch.Tensor | None:
        return self.module.bias if self.bias else None

    def params(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"{self.name}.{n}", p) for n, p in self.kind.params(self.module)]

    def clear(self) -> None:
        self.inputs = []
        self.passes = []
        self.dtypes = []
        self.grads = {}
        self.recomputed = []

    def drop_replaced_calls(self) -> None:
        """Activation checkpointing runs a module again inside backward()
        and the gradient reaches the recomputed call, not the original one:
        the calls no gradient reached are dropped when as many were
        recomputed (the same inputs, recomputed deterministically)."""
        if not any(self.recomputed):
            return
        keep = [k for k in range(len(self.inputs)) if k in self.grads]
        originals = sum(1 for r in self.recomputed if not r)
        if len(keep) != sum(self.recomputed) or (originals and originals != len(keep)):
            return  # not a recomputation: _passes refuses the mismatch
        self.inputs = [self.inputs[k] for k in keep]
        self.passes = [self.passes[k] for k in keep]
        self.dtypes = [self.dtypes[k] for k in keep]
        self.grads = {j: self.grads[k] for j, k in enumerate(keep)}
        self.recomputed = [True] * len(keep)


def _refuse_packed_attention(modules: dict, traceable: dict, layers) -> None:
    """``nn.MultiheadAttention`` applies its packed ``in_proj_weight`` and its
    ``out_proj`` weight outside any module's forward, where no hook sees
    them: refused, whether the whole model or its ``out_proj`` is traced."""
    for n, m in modules.items():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        inner = [f"{n}.{c}" if n else c for c, _ in m.named_modules() if c]
        named = layers is None or any(x in inner or x == n for x in layers)
        if named:
            raise InvalidInput(
                f"module {n!r} is an nn.MultiheadAttention, whose packed in_proj_weight and "
                "out_proj are applied outside any traced module: build attention from "
                "nn.Linear q/k/v/o projections (as Hugging Face models do), or name the "
                "layers to trace without it (layers=[...])"
            )
        for x in inner:
            traceable.pop(x, None)


def _refuse_tied(model: nn.Module, layers: list) -> None:
    """A parameter shared by a traced module and another module (tied
    weights) is refused: its gradient sums both uses, the records one."""
    owners: dict[int, dict[int, str]] = {}  # parameter → module → its name
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(m), f"{mn}.{pn}" if mn else pn)
    for l in layers:
        for name, p in l.params():
            others = [x for mid, x in owners.get(id(p), {}).items() if mid != id(l.module)]
            if others:
                other = others[0]
                raise InvalidInput(
                    f"layer {l.name!r}: its parameter {name!r} is also {other!r} (tied "
                    "weights), which is not traced: untie them, or leave both modules out "
                    "with layers=[...]"
                )


def _caller() -> int:
    """The stack level, for ``warnings.warn`` in the function that calls
    this, of the first frame outside this package and torch: the user's
    line that led to the warning."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# torch's intra-op thread count while tracers on the CPU hold it one below
# the cores (Tracer(torch_threads="auto")): how many running tracers hold
# it, the count before the first of them lowered it and the count it set.
_LOWERED: dict = {"holders": 0, "before": None, "to": None}


class _Refusal(Exception):
    """A step the tracer cannot record exactly: the run stops at its last commit."""


class Tracer:
    """Records a PyTorch training loop into a reptrace run.

    ::

        tracer = reptrace.Tracer(model, optimizer, "runs/mine", classes=names)
        for epoch in range(epochs):
            for ids, x, y in loader:          # ids: the examples' data set indices
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                tracer.step(loss, ids, y)      # checks, records, then optimizer.step()
            tracer.end_epoch()                 # weights snapshot + commit
        tracer.finish(probes=(x_test, y_test, test_ids))

    Parameters:
        model: any ``nn.Module``; its traced layers are the modules of a
            traced kind (``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d``,
            ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``) named in
            ``layers`` (qualified names as in ``model.named_modules()``, e.g.
            ``"encoder.block1.conv"``), or all of them that the optimizer
            updates but those named in ``exclude`` (frozen ones are listed in
            the manifest as ``model.frozen``).
        optimizer: ``torch.optim.SGD``, ``Adam`` or ``AdamW`` in instance
            mode (lr, momentum, dampening, Nesterov and weight decay, or
            Adam's betas, eps and state, are read for each traced layer at
            every step); any optimizer in batch mode.
        run_dir: the run directory to create (missing or empty).
        classes: class names, indexed by label.
        mode: ``"instance"`` (each example's share of each update) or
            ``"batch"`` (each step's whole update, any optimizer).
        dtype: ``"f32"`` or ``"f16"`` storage of the factors.
        compression: ``"zstd"`` (the storage encoding, default) or ``"none"``:
            the recorder's writer then keeps up with a fast loop at the cost
            of 1.6 to 2 times the bytes until ``reptrace.compact(run_dir)``
            (or ``reptrace compact``) rewrites the run, after training.
        torch_threads: ``"auto"`` (default): when the traced layers are on
            the CPU, the factors are compressed (zstd) and PyTorch runs as
            many threads as the process has cores, the tracer lowers
            PyTorch's thread count by one from its first step to
            ``finish()`` (or its end) and says so in a warning, so that the
            recorder's writer thread has a core of its own; PyTorch's
            waiting OpenMP threads and that thread slow each other down
            otherwise (×1.2 to ×1.8 on two cores). ``None`` leaves the
            thread count alone.
        scheduler: the learning-rate scheduler, if any (only its name is
            recorded; the values each step used are read at the step).
        scaler: a ``torch.amp.GradScaler``: ``step()`` then calls
            ``scaler.step(optimizer)`` (call ``scaler.update()`` after it, as
            usual), records the unscaled gradients and marks the steps the
            scaler skips.
        name: the model's name in the manifest (default: its class name).
        settings: free-form JSON-able training settings kept in the manifest.

    Under ``torch.distributed`` (detected when the tracer is made: a
    ``DistributedDataParallel`` model, or its ``module``, in an initialised
    process group) every rank makes its own tracer with the same arguments
    and run directory, and records the examples it processed into that one
    run (on a file system every rank shares); commits are collective and
    rank 0 writes the rest of the run (docs/python.md, "Distributed
    training (DDP)").
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        run_dir: str | os.PathLike,
        *,
        classes: list[str],
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
        mode: str = "instance",
        dtype: str = "f32",
        compression: str = "zstd",
        torch_threads: str | None = "auto",
        scheduler=None,
        scaler=None,
        name: str | None = None,
        settings: dict | None = None,
    ):
        if mode not in ("instance", "batch"):
            raise InvalidInput(f"mode: {mode!r}, expected 'instance' or 'batch'")
        if dtype not in ("f32", "f16"):
            raise InvalidInput(f"dtype: {dtype!r}, expected 'f32' or 'f16'")
        if compression not in ("zstd", "none"):
            raise InvalidInput(f"compression: {compression!r}, expected 'zstd' or 'none'")
        if torch_threads not in ("auto", None):
            raise InvalidInput(
                f"torch_threads: {torch_threads!r}, expected 'auto' or None (to set a number, "
                "call torch.set_num_threads and pass None)"
            )
        if scaler is not None and not (hasattr(scaler, "step") and hasattr(scaler, "unscale_")):
            raise InvalidInput(
                f"scaler: a {type(scaler).__name__}, expected a torch.amp.GradScaler"
            )
        run_dir = Path(run_dir)
        # A DDP wrapper records as its module: the layers keep their names.
        ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
        if ddp is not None and isinstance(model, ddp):
            model = model.module
        # torch.distributed: the ranks record one run (_distributed.py).
        self._world = _distributed.World.detect()
        self._owner = self._world is None or self._world.owner
        problem = None
        if self._owner and run_dir.exists() and (
                not run_dir.is_dir() or any(run_dir.iterdir())):
            problem = f"{run_dir}: the run directory exists and is not empty; give a new one"
            if self._world is None:
                raise InvalidInput(problem)
        self.model = model
        self.optimizer = optimizer
        self.run_dir = run_dir
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 2:
            raise InvalidInput(f"classes: {len(self.classes)} given, at least 2 needed")
        self.mode = mode
        self.dtype = dtype
        self.compression = compression
        self.torch_threads = torch_threads
        self._holds_threads = False
        self.scheduler = scheduler
        self.scaler = scaler
        self.name = name or type(model).__name__
        self.settings = dict(settings or {})
        # The per-step gradient check; off only for the benchmark that measures its cost.
        self._check = True

        modules = dict(model.named_modules())
        traceable = {n: m for n, m in modules.items() if _kinds.of(m) is not None}
        _refuse_packed_attention(modules, traceable, layers)
        if not traceable:
            raise InvalidInput(
                f"{type(model).__name__} has no layer of a traced kind ({_kinds.MODULE_NAMES}) "
                "with a weight to train"
            )
        self._param_group = {
            id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]
        }
        if exclude is not None:
            if layers is not None:
                raise InvalidInput("exclude: give layers=[...] or exclude=[...], not both")
            for n in exclude:
                if n not in traceable:
                    raise InvalidInput(
                        f"exclude: {n!r} is no layer of a traced kind; the model's "
                        f"{_kinds.SHORT_NAMES} layers: " + ", ".join(traceable)
                    )
            traceable = {n: m for n, m in traceable.items() if n not in set(exclude)}
            if not traceable:
                raise InvalidInput("exclude: every layer of a traced kind is excluded")
        names, self._frozen = self._select(traceable, modules, layers)
        for n in names:
            _reptrace.check_layer_name(n)
            refusal = _kinds.of(modules[n]).refusal(n, modules[n])
            if refusal is not None:
                raise InvalidInput(refusal)
        self._layers = [_Layer(n, modules[n]) for n in names]
        _refuse_tied(model, self._layers)
        self._by_module = {id(l.module): l for l in self._layers}

        if mode == "instance":
            for n, m in modules.items():
                if isinstance(m, _COUPLING):
                    raise InvalidInput(
                        f"module {n!r} ({type(m).__name__}) couples the examples of a batch, "
                        "so per-example updates are not defined: record in batch mode (mode='batch')"
                    )
            if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
                raise InvalidInput(
                    f"{type(optimizer).__name__} in instance mode: only torch.optim.SGD, "
                    "Adam and AdamW updates are traced per example; record in batch mode "
                    "(mode='batch')"
                )
        # "adam"/"adamw" when instance mode records Adam's preconditioner.
        self._adam = _adam_kind(optimizer) if mode == "instance" else None
        self._assign_groups()
        self._optimizer_json = self._describe_optimizer()
        if self._world is not None:
            self._agree_world(problem)

        # W_0: the traced layers' weights as the first step finds them, read
        # when the recorder starts (_start): a checkpoint loaded after the
        # tracer was made is where training starts from.
        self._initial = None
        self._instances = None
        self._rec: _reptrace.Recorder | None = None
        self._step = 0
        self._epoch = 0
        # The last step the latest weights snapshot includes (-1: the initial one).
        self._snapshot_step = -1
        self._order: list[str] = []
        self._pending = None
        self._closed = False
        self._max_id = -1
        self._generator: torch.Generator | None = None
        self._draws = 0x7E9 << 32  # seeds of the check's directions on the host
        self._hooks = [l.module.register_forward_hook(self._forward) for l in self._layers]
        # The model's outputs of the step's forward passes, for the `examples`
        # table (each example's loss and prediction).
        self._outputs: list[torch.Tensor] = []
        self._explicit_logits = False
        self._hooks.append(model.register_forward_hook(self._model_output))
        # Forward passes of the whole model since the last step: a layer's
        # calls in one pass are positions of one record (a reused module).
        self._model_passes = 0
        self._hooks.append(model.register_forward_pre_hook(self._model_input))
        # An optimizer step the run has no records of (taken outside step()
        # once recording started) is refused before it changes the weights.
        self._in_step = False
        self._hooks.append(optimizer.register_step_pre_hook(self._outside_step))
        # follow_optimizer(): the micro-batches batch() told of since the
        # last step, the traced weights before the step the optimizer is
        # taking, and whether the optimizer has already stepped.
        self._following = False
        self._fed: list[tuple] = []
        self._fed_sizes: list[int] | None = None
        self._before: list[list[torch.Tensor]] | None = None
        self._stepped = False

    # ------------------------------------------------------------ set-up

    def _trains(self, p: torch.Tensor) -> bool:
        return p.requires_grad and id(p) in self._param_group

    def _select(self, traceable: dict, modules: dict, layers) -> tuple[list[str], list[str]]:
        """The layers to trace and the frozen ones left out: with ``layers``
        None every layer the optimizer updates; a layer must train whole."""
        def state(m) -> str:
            trains = [self._trains(p) for _, p in _kinds.of(m).params(m)]
            return "trains" if all(trains) else ("frozen" if not any(trains) else "partly")

        def partly(n, m) -> InvalidInput:
            w = "trains" if self._trains(m.weight) else "is frozen"
            b = "trains" if self._trains(m.bias) else "is frozen"
            return InvalidInput(
                f"layer {n!r}: its weight {w} and its bias {b}; a layer is traced whole "
                "(freeze both or neither, or leave it out with layers=[...])"
            )

        if layers is None:
            names, frozen = [], []
            for n, m in traceable.items():
                st = state(m)
                if st == "partly":
                    raise partly(n, m)
                (names if st == "trains" else frozen).append(n)
            if not names:
                raise InvalidInput(
                    f"every {_kinds.MODULE_NAMES} layer of {type(self.model).__name__} is "
                    "frozen (requires_grad=False, or not in the optimizer's param_groups): "
                    "nothing to trace"
                )
            return names, frozen
        names = list(layers)
        if not names:
            raise InvalidInput("layers: empty; name at least one layer, or None for all")
        for n in names:
            if n not in modules:
                raise InvalidInput(
                    f"unknown layer {n!r}; the model's {_kinds.SHORT_NAMES} layers: "
                    + ", ".join(traceable)
                )
            if n not in traceable:
                raise InvalidInput(
                    f"layer {n!r} is a {type(modules[n]).__name__}: only {_kinds.MODULE_NAMES} "
                    "layers can be traced"
                )
            st = state(modules[n])
            if st == "partly":
                raise partly(n, modules[n])
            if st == "frozen":
                raise InvalidInput(
                    f"layer {n!r} is frozen (requires_grad=False, or not in the optimizer's "
                    "param_groups): the optimizer does not update it, so there is nothing "
                    "to trace; leave it out of layers=[...]"
                )
        return names, []

    def _assign_groups(self) -> None:
        """Each traced layer follows the parameter group of its weight; its
        bias may sit in another group that agrees on every hyper-parameter
        that shapes a record (weight decay may differ: it is the residual)."""
        groups = self.optimizer.param_groups
        for l in self._layers:
            l.group = self._param_group[id(l.weight)]
            l.bias_group = self._param_group[id(l.bias_param)] if l.bias else l.group
            if self.mode == "instance":
                self._agree(l)
                refusal = self._unsupported(l)
                if refusal is not None:
                    raise InvalidInput(refusal)

    def _unsupported(self, l: _Layer) -> str | None:
        """Why the options of the layer's parameter groups cannot be traced
        in instance mode, in one line, or None."""
        name = type(self.optimizer).__name__
        for i in dict.fromkeys((l.group, l.bias_group)):
            g = self.optimizer.param_groups[i]
            for option in ("maximize", "differentiable") if self._adam else ("maximize",):
                if g.get(option):
                    return (f"layer {l.name!r}: {name} with {option}=True is not traced in "
                            "instance mode; record in batch mode (mode='batch')")
            decoupled = bool(g.get("decoupled_weight_decay", False)) or isinstance(
                self.optimizer, torch.optim.AdamW)
            if self._adam is not None and decoupled != (self._adam == "adamw"):
                return (f"layer {l.name!r}: {name} with decoupled_weight_decay in some param "
                        "groups and not in others is not traced in instance mode")
        return None

    def _agree(self, l: _Layer, step: int | None = None) -> None:
        if l.bias_group == l.group:
            return
        gw, gb = self.optimizer.param_groups[l.group], self.optimizer.param_groups[l.bias_group]
        shaping = _SHAPING
        if self._adam is not None:
            shaping = _ADAM_SHAPING + (("weight_decay",) if self._adam == "adamw" else ())
        for k in shaping:
            if _group_value(gw, k) != _group_value(gb, k):
                at = "" if step is None else f" at step {step}"
                message = (
                    f"layer {l.name!r}: its weight (param group {l.group}) and bias (param "
                    f"group {l.bias_group}) have different {k}{at} ({_group_value(gw, k)} and "
                    f"{_group_value(gb, k)}); a record holds one update of the whole layer: "
                    "give them the same settings or one group, or record in batch mode "
                    "(mode='batch')"
                )
                raise InvalidInput(message) if step is None else _Refusal(message)

    def _describe_optimizer(self) -> dict:
        g = self.optimizer.param_groups[self._layers[0].group]
        kind = next(
            (k for cls, k in _OPTIMIZER_KINDS.items() if type(self.optimizer) is cls), "other"
        )
        if self._adam is not None or kind == "adam" and g.get("decoupled_weight_decay"):
            kind = self._adam or "adamw"
        self.settings.setdefault("optimizer", type(self.optimizer).__name__)
        self.settings.setdefault("producer", "reptrace python package (PyTorch "
                                 + torch.__version__ + ")")
        if len({l.group for l in self._layers} | {l.bias_group for l in self._layers}) > 1:
            self.settings.setdefault("param_groups", len(self.optimizer.param_groups))
        schedule = (
            type(self.scheduler).__name__ if self.scheduler is not None else "param_groups lr"
        )
        opt = {
            "kind": kind,
            "lr": float(g["lr"]),
            "schedule": {"kind": "external", "name": schedule},
            "momentum": float(g.get("momentum", 0.0) or 0.0),
            "dampening": float(g.get("dampening", 0.0) or 0.0),
            "nesterov": bool(g.get("nesterov", False)),
            "weight_decay": float(g.get("weight_decay", 0.0) or 0.0),
        }
        if kind in ("adam", "adamw"):
            opt["betas"] = [float(b) for b in g["betas"]]
            opt["eps"] = float(g["eps"])
            opt["momentum"], opt["dampening"], opt["nesterov"] = 0.0, 0.0, False
        if kind != "sgd" and self.mode == "batch":
            # The analyzer reads nothing of them in batch mode; kept for the reader.
            opt["momentum"], opt["dampening"], opt["nesterov"] = 0.0, 0.0, False
        return opt

    def _agree_world(self, problem: str | None) -> None:
        """torch.distributed: the ranks compare what they trace (layers,
        kinds and parameter shapes, mode and dtype) and rank 0's verdict on
        the run directory; a difference is refused on every rank, in the
        same line."""
        world = self._world
        mine = (_distributed.layer_table(self._layers), self.mode, self.dtype)
        views = world.agree((mine, problem))
        if views[0][1] is not None:
            raise InvalidInput(views[0][1])
        first = views[0][0]
        for r, (theirs, _) in enumerate(views):
            if theirs == first:
                continue
            if theirs[1:] != first[1:]:
                what = (f"records mode={theirs[1]!r}, dtype={theirs[2]!r} and rank 0 "
                        f"mode={first[1]!r}, dtype={first[2]!r}")
            else:
                what = (f"traces {_distributed.describe(theirs[0])} and rank 0 "
                        f"{_distributed.describe(first[0])}")
            raise InvalidInput(
                f"torch.distributed: rank {r} {what}: every rank records one run and must "
                "trace the same layers of the same model (give every rank the same model, "
                "layers=[...] and settings)"
            )
        self.settings.setdefault("world_size", world.size)
        if world.owner:
            self.settings.setdefault("distributed_backend", torch.distributed.get_backend())

    def _weights(self, tensors=None) -> list[tuple[str, list[int], np.ndarray]]:
        """The traced layers' parameters, or ``tensors`` in their place (per
        layer, in the order of its params)."""
        out = []
        for k, l in enumerate(self._layers):
            for j, (n, p) in enumerate(l.params()):
                if tensors is not None:
                    p = tensors[k][j]
                t = p.detach().to("cpu", torch.float32).contiguous()
                out.append((n, list(t.shape), t.numpy().reshape(-1).copy()))
        return out

    @staticmethod
    def _unpack(weights):
        names = [n for n, _, _ in weights]
        shapes = [s for _, s, _ in weights]
        arrays = [a for _, _, a in weights]
        return names, shapes, arrays

    def instances(self, ids, labels, split: str | list[str] = "train") -> None:
        """Declares the data set's instances (ids, labels and split), written
        to the ``instances`` table at the first commit. Optional: without it
        the table holds the instances the steps saw."""
        ids = _ints(ids, np.int64, "ids")
        labels = _ints(labels, np.int32, "labels")
        if len(ids) != len(labels):
            raise InvalidInput(f"instances: {len(ids)} ids and {len(labels)} labels")
        splits = [split] * len(ids) if isinstance(split, str) else list(split)
        if len(splits) != len(ids):
            raise InvalidInput(f"instances: {len(ids)} ids and {len(splits)} splits")
        if not self._owner:
            pass  # rank 0 writes the instances of a distributed run
        elif self._rec is not None:
            self._rec.instances(ids, labels, splits)
        else:
            self._instances = (ids, labels, splits)
        if len(ids):
            self._max_id = max(self._max_id, int(ids.max()))

    def _start(self) -> None:
        """Creates the run at the first step: the manifest (shapes from the
        captured inputs), the instances and the initial weights W_0, the
        weights the first update starts from (under :meth:`follow_optimizer`
        the optimizer has taken that step already: from before it)."""
        self._initial = self._weights(self._before if self._stepped else None)
        order = [n for n in self._order if n in {l.name for l in self._layers}]
        by_name = {l.name: l for l in self._layers}
        modules = []
        input_shape: list[int] = []
        for n in order:
            l = by_name[n]
            x = l.inputs[0]
            first = [l.inputs[k] for k in l.calls[0]]  # the first pass's calls (_passes)
            l.spec = l.kind.spec(n, l.module, first, self.mode)
            modules.append(l.spec)
            if not input_shape:
                input_shape = [int(s) for s in x.shape[1:]]
        self._layers = [by_name[n] for n in order]
        model = {
            "name": self.name,
            "input_shape": self.settings.pop("input_shape", input_shape),
            "structure": "traced_layers",
            "modules": modules,
        }
        if self._frozen:
            model["frozen"] = self._frozen
        self._w0 = {name: arr for name, _, arr in self._initial}
        if self._world is not None:
            self._start_world(model)
        else:
            self._rec = self._recorder(model)
        self._initial = None
        self._lower_threads()

    def _lower_threads(self) -> None:
        """torch_threads="auto", once the run is made: one PyTorch thread
        fewer than cores while this tracer records on the CPU with compression, so that the
        recorder's writer thread has a core of its own; every tracer that
        finds the count lowered holds it until its end
        (:meth:`_raise_threads`). Without compression the writer needs a
        fraction of a core, and a small CNN on 2 cores trained faster with
        every thread than with one fewer (docs/benchmarks.md)."""
        if (self._holds_threads or self.torch_threads != "auto" or self.compression == "none"
                or self._layers[0].weight.device.type != "cpu"):
            return
        if _LOWERED["holders"] == 0:
            cores, before = _cores(), torch.get_num_threads()
            if cores < 2 or before < cores:
                return
            torch.set_num_threads(cores - 1)
            _LOWERED.update(before=before, to=cores - 1)
            warnings.warn(
                f"reptrace: PyTorch's threads {before} -> {cores - 1} while the tracer records "
                f"on {cores} cores, leaving one to its writer thread (until finish(); "
                "Tracer(torch_threads=None) keeps them)",
                RuntimeWarning, stacklevel=_caller())
        _LOWERED["holders"] += 1
        self._holds_threads = True

    def _raise_threads(self) -> None:
        """Gives PyTorch its thread count back once no tracer holds it
        lowered, unless the program has set another one since."""
        if not self._holds_threads:
            return
        self._holds_threads = False
        _LOWERED["holders"] -= 1
        if _LOWERED["holders"] == 0 and torch.get_num_threads() == _LOWERED["to"]:
            torch.set_num_threads(_LOWERED["before"])

    def _recorder(self, model: dict, run_id: str | None = None):
        """The Rust recorder: creates the run (rank 0 of a distributed run
        or a single process: with the instances and initial weights as
        commit 0), or, on another rank, writes into rank 0's run."""
        rank = None if self._world is None else self._world.rank
        rec = _reptrace.Recorder(
            str(self.run_dir),
            json.dumps(model),
            json.dumps(self._optimizer_json),
            self.classes,
            self.dtype,
            self.mode,
            json.dumps(self.settings),
            run_id=run_id,
            rank=rank,
            compression=self.compression,
        )
        if self._owner:
            if self._instances is not None:
                rec.instances(*self._instances)
                self._instances = None
            rec.weights(*self._unpack(self._initial))
            rec.commit()
        return rec

    def _start_world(self, model: dict) -> None:
        """torch.distributed: the ranks agree on the model's specs (from
        their first step's shapes), rank 0 creates the run and every other
        rank joins it by its run id; a failure is raised on every rank."""
        world = self._world
        specs = world.agree(json.dumps(model["modules"], sort_keys=True))
        for r, theirs in enumerate(specs):
            if theirs != specs[0]:
                self._closed_quietly()
                raise InvalidInput(
                    f"torch.distributed: rank {r}'s traced layers saw other shapes at the "
                    f"first step than rank 0's ({theirs} vs {specs[0]}): every rank must "
                    "feed the model inputs of one shape"
                )
        run_id, problem = None, None
        if world.owner:
            try:
                self._rec = self._recorder(model)
                run_id = self._rec.run_id
            except Exception as e:  # every rank learns why
                problem = f"{type(e).__name__}: {e}"
        run_id, problem = world.broadcast((run_id, problem))
        if problem is not None:
            self._closed_quietly()
            raise RecordError(f"torch.distributed: rank 0 could not create the run: {problem}")
        if not world.owner:
            try:
                self._rec = self._recorder(model, run_id)
            except Exception as e:
                problem = f"rank {world.rank}: {type(e).__name__}: {e}"
        problems = [p for p in world.agree(problem) if p is not None]
        if problems:
            self._closed_quietly()
            raise RecordError(f"torch.distributed: a rank could not join the run: {problems[0]}")

    def _closed_quietly(self) -> None:
        """Closes a tracer whose ranks could not start together (rank 0's
        run, if made, is marked aborted)."""
        rec, self._rec = self._rec, None
        self._close()
        if rec is not None:
            rec.abandon("the ranks of the distributed run could not start together")

    # ------------------------------------------------------------ capture

    def _model_output(self, module, inputs, output):
        if not self._closed and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            self._outputs.append(output.detach())

    def _examples(self, logits, labels: np.ndarray):
        """Each example's cross-entropy and predicted class from the step's
        output (logits or log-probabilities: log_softmax of either is the
        same), or None when the output is not (batch, classes): on the
        device as tensors, which reach the host with the step's one
        transfer (:meth:`_fetch`), or for CPU logits on the host already
        (NumPy arrays from the extension)."""
        if logits is None:
            return None
        if not isinstance(logits, torch.Tensor):
            raise InvalidInput("logits: expected a torch.Tensor of shape (batch, classes)")
        if logits.dim() != 2 or logits.shape != (len(labels), len(self.classes)):
            if self._explicit_logits:
                raise InvalidInput(
                    f"logits: shape {tuple(logits.shape)}, expected ({len(labels)}, "
                    f"{len(self.classes)}) (batch, classes)"
                )
            return None
        if _ON_HOST and logits.device.type == "cpu":
            # One call into the extension (float64, as `reptrace train`
            # computes them) instead of a handful of small operations.
            z = logits.detach()
            return _reptrace.example_losses(
                (z if z.dtype == torch.float32 else z.float()).contiguous().numpy(),
                np.ascontiguousarray(labels, dtype=np.int32))
        log_p = torch.log_softmax(logits.detach().float(), dim=1)
        target = torch.from_numpy(labels.astype(np.int64))
        if log_p.device.type == "cuda":
            # From pinned memory without waiting: a copy from pageable
            # memory would synchronise the device.
            target = target.pin_memory().to(log_p.device, non_blocking=True)
        else:
            target = target.to(log_p.device)
        loss = -log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        return loss, log_p.argmax(dim=1)

    def _forward(self, module, inputs, output):
        if self._closed or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad:
            return
        layer = self._by_module[id(module)]
        k = len(layer.inputs)
        layer.inputs.append(inputs[0].detach())
        layer.passes.append(self._model_passes)
        layer.dtypes.append(output.dtype)
        layer.recomputed.append(torch._C._current_autograd_node() is not None)
        if layer.name not in self._order:
            self._order.append(layer.name)

        def keep(grad, layer=layer, k=k):
            layer.grads[k] = grad.detach()

        output.register_hook(keep)

    def _model_input(self, module, inputs):
        if not self._closed and torch.is_grad_enabled():
            self._model_passes += 1

    def _clear(self) -> None:
        for l in self._layers:
            l.clear()
        self._outputs = []
        self._model_passes = 0

    # ------------------------------------------------------------ steps

    def _passes(self, examples: int) -> list[int]:
        """The batch size of each forward/backward pass since the last step
        (one per micro-batch), checked to be the same for every traced layer;
        sets each layer's ``calls``: the indices of its calls in each pass.
        ``examples``: how many ids the step was given."""
        missing = [l.name for l in self._layers if not l.grads]
        if len(missing) == len(self._layers):
            raise InvalidInput(
                "step() before loss.backward(): no gradient has reached the traced layers "
                "(call loss.backward() first, in a forward pass with gradients enabled)"
            )
        if missing:
            raise InvalidInput(
                f"no gradient reached layer(s) {', '.join(missing)} in this step; "
                "trace only layers that take part in the loss (layers=[...])"
            )
        for l in self._layers:
            l.drop_replaced_calls()
            if len(l.grads) != len(l.inputs):
                raise InvalidInput(
                    f"layer {l.name!r} ran {len(l.inputs)} times since the last step but "
                    f"{len(l.grads)} backward pass(es) reached it: run evaluation under "
                    "torch.no_grad(), and call backward() once per forward pass"
                )
            # Without a forward pass of the whole model seen (a loop that calls
            # a part of it), each call is a pass of its own.
            keys = l.passes if self._model_passes else list(range(len(l.inputs)))
            order = list(dict.fromkeys(keys))
            l.calls = [[k for k, p in enumerate(keys) if p == q] for q in order]
        first = self._layers[0]
        for l in self._layers:
            if len(l.calls) != len(first.calls):
                raise InvalidInput(
                    f"layer {l.name!r} ran in {len(l.calls)} forward passes since the last "
                    f"step and layer {first.name!r} in {len(first.calls)}: every traced layer "
                    "must run in every forward pass"
                )
        seen = [
            {int(l.inputs[k].shape[0]) if l.inputs[k].dim() else 0
             for l in self._layers for k in l.calls[j]}
            for j in range(len(first.calls))
        ]
        if self._fed_sizes is not None and len(self._fed_sizes) == len(first.calls):
            sizes = list(self._fed_sizes)
        elif all(len(x) == 1 for x in seen):
            sizes = [next(iter(x)) for x in seen]
        elif len(first.calls) == 1:
            sizes = [examples]
        else:  # micro-batches told as one: the largest first dimension is the batch
            sizes = [max(x) for x in seen]
        for l in self._layers:
            for j, calls in enumerate(l.calls):
                if len(calls) > 1 and not l.kind.sequence:
                    raise InvalidInput(
                        f"layer {l.name!r} ran {len(calls)} times in one forward pass: a "
                        f"{type(l.module).__name__} is traced when it runs once per pass (reused "
                        "modules are traced for Linear, Embedding and norm layers)"
                    )
                for k in calls:
                    self._check_call(l, l.inputs[k], sizes[j])
                if l.spec is not None and l.kind.sequence and not l.spec.get("ragged"):
                    t = sum(l.kind.positions(l.module, l.inputs[k]) for k in calls)
                    if t != l.spec.get("positions", 1):
                        raise InvalidInput(
                            f"layer {l.name!r}: {t} positions per example at step {self._step} "
                            f"and {l.spec.get('positions', 1)} at the first step; a layer "
                            "that sees no sequence is recorded at one number of calls per "
                            "forward pass"
                        )
        return sizes

    def _check_call(self, l: _Layer, x: torch.Tensor, batch: int) -> None:
        refusal = l.kind.check_input(l.name, x)
        if refusal is not None:
            raise InvalidInput(refusal)
        if int(x.shape[0]) != batch:
            raise InvalidInput(
                f"layer {l.name!r}: input of shape {tuple(x.shape)} in a forward pass of "
                f"{batch} examples: its first dimension must be the batch (an input shared "
                "by the batch, e.g. position ids of shape (1, T), has no per-example "
                "update; expand it to (batch, ...) or leave the layer out with layers=[...])"
            )

    def _hyper(self, l: _Layer) -> dict:
        """The layer's parameter group's values for this step."""
        self._agree(l, self._step)
        g = self.optimizer.param_groups[l.group]
        if self.mode == "instance":
            refusal = self._unsupported(l)
            if refusal is not None:
                raise _Refusal(f"{refusal} (step {self._step})")
        return {
            "lr": float(g["lr"]),
            "momentum": float(g.get("momentum", 0.0) or 0.0),
            "dampening": float(g.get("dampening", 0.0) or 0.0),
            "nesterov": bool(g.get("nesterov", False)),
            "weight_decay": float(g.get("weight_decay", 0.0) or 0.0),
        }

    def _skips(self) -> bool:
        """With a gradient scaler: unscales the gradients (unless the loop
        did, e.g. to clip them) and tells whether the scaler will skip the
        step, i.e. whether some gradient of the optimizer is inf or NaN."""
        if self.scaler is None or not self.scaler.is_enabled():
            return False
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as e:
            if "already been called" not in str(e):
                raise
        grads = [
            p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        if not grads:
            return False
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return not bool(finite)

    def step(self, loss, ids, labels, *, logits=None) -> None:
        """Records this training step and then calls ``optimizer.step()``
        (``scaler.step(optimizer)`` with a scaler): call it after
        ``backward()``, in place of the optimizer step. Once the run's first
        step is recorded, an ``optimizer.step()`` outside it is refused
        before it changes the weights (the run stops at the step before it).
        At the first step the run's initial weights are read, and in
        instance mode an optimizer holding a momentum buffer or Adam's first
        moment from earlier steps is refused.

        ``ids`` are the batch's instance ids (e.g. the data set indices),
        ``labels`` their classes, both in the batch's order; with gradient
        accumulation, those of every micro-batch since the last step, in the
        order they ran. ``loss`` is the step's loss as you count it (recorded
        in ``steps.loss``; None: the mean cross-entropy of its examples).

        Before the optimizer step, each traced layer's gradient (``.grad``)
        is checked against the sum of the per-example gradients the step
        records: they may differ by one scalar per layer (clipping by norm,
        a gradient scaler), which is measured and folded into the records;
        any other difference stops the run at its last commit with a
        :class:`RecordError`.

        Each example's loss (cross-entropy), predicted class and probability
        of its label go into the ``examples`` table, computed from
        ``logits`` (batch × classes, logits or log-probabilities) or, when
        not given, from the model's outputs of this step's forward passes
        when those are (batch, classes) tensors."""
        if self._closed:
            raise RecordError(f"{self.run_dir}: the tracer is finished")
        if self._rec is None and not self._stepped:
            self._refuse_carried_state()
        # Tensors (on a GPU, say) in one copy to the host.
        ids, labels = _ints_together([(ids, np.int64, "ids"), (labels, np.int32, "labels")])
        sizes = self._passes(len(ids))
        batch = sum(sizes)
        passes = f" in {len(sizes)} forward passes" if len(sizes) > 1 else ""
        if len(ids) != batch:
            raise InvalidInput(f"ids: {len(ids)} ids for a batch of {batch} examples{passes}")
        if len(labels) != batch:
            raise InvalidInput(
                f"labels: {len(labels)} labels for a batch of {batch} examples{passes}"
            )
        # (int32 labels: a negative one is a large unsigned one.)
        if len(labels) and labels.view(np.uint32).max() >= len(self.classes):
            raise InvalidInput(
                f"labels: values must be in 0..{len(self.classes) - 1} ({len(self.classes)} classes)"
            )
        self._explicit_logits = logits is not None
        if logits is None and self._outputs and sum(len(o) for o in self._outputs) == batch:
            logits = torch.cat(self._outputs) if len(self._outputs) > 1 else self._outputs[0]
        examples = self._examples(logits, labels)
        if loss is None and examples is None:
            raise InvalidInput(
                "batch(): no loss given and no (batch, classes) output of the model to "
                "compute it from; give each micro-batch's loss: batch(ids, labels, loss=...)"
            )
        due = _Due(loss, examples, batch)
        if self._rec is None:
            self._start()
        self._max_id = max(self._max_id, int(ids.max()) if len(ids) else -1)
        lr = float(self.optimizer.param_groups[self._layers[0].group]["lr"])
        try:
            if self._skips():
                self._record_skipped(due, ids, labels, lr)
            elif self.mode == "instance":
                self._record_instance(due, ids, labels, lr)
            else:
                self._record_batch(due, ids, labels, lr)
        except _Refusal as e:
            self._stop(str(e), str(e))
        finally:
            self._clear()
        self._step += 1

    def _fetch(self, due: "_Due", terms=(), finite: bool = True
               ) -> tuple[np.ndarray, int, float, tuple | None]:
        """The step's one transfer from the device: the gradient check's
        terms of every layer (:meth:`_check_flat`) and what the host needs
        of the step (:class:`_Due`) in one copy, so that a step on a GPU
        synchronises once. Returns the terms (float64), the step's batch
        size and loss (over every rank under torch.distributed) and its
        examples' ``(loss, predicted)``; refuses a non-finite loss unless
        ``finite`` is False."""
        flat = self._check_flat(terms)
        if isinstance(flat, np.ndarray):  # every layer checked on the host
            checks, rest = flat, _host(due.parts())
        else:
            host = _host(([] if flat is None else [flat]) + due.parts())
            n = 0 if flat is None else int(flat.shape[0])
            checks, rest = host[:n], host[n:]
        value, examples = due.decode(rest)
        total = due.batch
        if self._world is not None:
            value, total = self._world_step(value, due.batch)
        if finite and not math.isfinite(value):
            raise _Refusal(f"non-finite loss {value} at step {self._step}")
        return checks, total, value, examples

    def _world_step(self, value: float, batch: int) -> tuple[float, int]:
        """torch.distributed: the step's loss and batch size over every
        rank (the loss averaged by the ranks' batch sizes: the mean over the
        global batch when each rank's is its local mean)."""
        t = torch.tensor([value * batch, float(batch)], dtype=torch.float64)
        self._world.sum_(t)
        total = int(round(float(t[1])))
        return (float(t[0]) / total if total else value), total

    def follow_optimizer(self) -> None:
        """Records each step as the optimizer takes it, for loops and
        trainers that call ``optimizer.step()`` themselves (the Hugging Face
        and Lightning callbacks use it): from now on hooks on the optimizer
        record every ``optimizer.step()`` (weights before it, the record
        after it, checked as :meth:`step` checks), and :meth:`batch` tells
        the ids and labels of each micro-batch. Call it instead of
        :meth:`step`; gradient clipping between ``backward()`` and the step
        is measured as with :meth:`step`. A step refused after the optimizer
        took it leaves the run at the weights from before it."""
        if self._closed:
            raise RecordError(f"{self.run_dir}: the tracer is finished")
        if self.scaler is not None:
            raise InvalidInput(
                "follow_optimizer(): a GradScaler may skip steps the optimizer never sees; "
                "with a scaler, record through step(loss, ids, labels)"
            )
        if self._following:
            return
        self._following = True
        self._hooks.append(self.optimizer.register_step_pre_hook(self._before_step))
        self._hooks.append(self.optimizer.register_step_post_hook(self._after_step))

    def batch(self, ids, labels, *, loss=None, logits=None) -> None:
        """One micro-batch's instance ids and labels under
        :meth:`follow_optimizer`, in the order the micro-batches run; its
        ``loss`` (a scalar: the step's recorded loss is the sum of its
        micro-batches' losses, as a loop that divides each by the number of
        micro-batches counts it; without them, the mean cross-entropy of its
        examples) and ``logits`` (batch × classes) when at hand."""
        if not self._following:
            raise InvalidInput(
                "batch(): call follow_optimizer() first, or give ids and labels to step()"
            )
        if self._closed:
            raise RecordError(f"{self.run_dir}: the tracer is finished")
        # Tensors stay where they are until the step reads every
        # micro-batch's ids and labels in one copy (:meth:`_take_fed`).
        self._fed.append((
            _int_tensor(ids, np.int64, "ids"),
            _int_tensor(labels, np.int32, "labels"),
            None if loss is None else _scalar(loss),
            None if logits is None else logits.detach(),
        ))

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._closed:
            if self._rec is None:
                self._refuse_carried_state()
            self._before = [[p.detach().clone() for _, p in l.params()] for l in self._layers]

    def _refuse_carried_state(self) -> None:
        """Instance mode, before the run's first optimizer step: the
        optimizer must hold no first moment (SGD's momentum buffer, Adam's
        ``exp_avg``) for a traced parameter. One carried over from earlier
        steps (a resumed checkpoint, steps taken before tracing) adds
        gradients the run has no records of to every later update, and the
        trace would not add up. Read once, at the first step; a refusal
        ends the tracer before it made the run."""
        if self.mode != "instance":
            return
        key, what = (("exp_avg", f"{type(self.optimizer).__name__}'s first moment (exp_avg)")
                     if self._adam is not None else ("momentum_buffer", "a momentum buffer"))
        for l in self._layers:
            for name, p in l.params():
                moment = self.optimizer.state.get(p, {}).get(key)
                if moment is not None and bool(moment.detach().ne(0).any()):
                    self._close()  # its hooks off the model and the optimizer
                    raise InvalidInput(
                        f"parameter {name!r}: the optimizer holds {what} from steps before the "
                        "run's first (a resumed checkpoint, or steps taken before tracing), whose "
                        "gradients the run has no records of and every later update carries: "
                        "instance mode cannot trace it; start the run with the optimizer's "
                        "state fresh, or record in batch mode (mode='batch')"
                    )

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        if not self._fed:
            self._clear()
            raise InvalidInput(
                "the optimizer took a step with no batch() since the last one: call "
                "tracer.batch(ids, labels) for each micro-batch"
            )
        sizes = [len(f[0]) for f in self._fed]
        ids, labels, losses, passes, logits = self._take_fed()
        loss = _sum_losses(losses) if len(losses) == passes else None
        self._stepped = True
        self._fed_sizes = sizes
        try:
            self.step(loss, ids, labels, logits=logits)
        finally:
            self._stepped = False
            self._fed_sizes = None
            self._before = None

    def _take_fed(self):
        """The micro-batches told since the last step, joined and forgotten:
        ``(ids, labels, the losses given, the number of micro-batches, their
        logits or None unless every one gave them)``."""
        fed, self._fed = self._fed, []
        values = _ints_together([(f[0], np.int64, "ids") for f in fed]
                                + [(f[1], np.int32, "labels") for f in fed])
        ids = np.concatenate(values[:len(fed)])
        labels = np.concatenate(values[len(fed):])
        losses = [f[2] for f in fed if f[2] is not None]
        logits = None
        if all(f[3] is not None for f in fed):
            logits = torch.cat([f[3] for f in fed])
        return ids, labels, losses, len(fed), logits

    def skipped(self) -> None:
        """Under :meth:`follow_optimizer`: the micro-batches told since the
        last step led to no optimizer step (a trainer skipped it, e.g. for a
        non-finite gradient); recorded as a skipped step."""
        if not self._fed:
            return
        ids, labels, losses, _, _ = self._take_fed()
        value = _sum_losses(losses) if losses else math.nan
        if self._rec is None:
            self._clear()
            return
        lr = float(self.optimizer.param_groups[self._layers[0].group]["lr"])
        self._stepped = True
        try:
            # A trainer skips a step for its non-finite gradient or loss:
            # recorded as it is.
            self._record_skipped(_Due(value, None, len(ids)), ids, labels, lr, finite=False)
        finally:
            self._stepped = False
            self._clear()
        self._step += 1

    def _stop(self, reason: str, message: str) -> None:
        """Ends the run, marked aborted, and raises: the steps recorded so
        far are committed with a snapshot of the weights they led to (the
        optimizer has not applied the refused step, or, when it already has
        under :meth:`follow_optimizer`, the weights from before it), so the run
        is analysed up to its last good step. Under torch.distributed the
        run stays at its last commit instead (a commit needs every rank, and
        the others may be gone): what each rank recorded since is dropped."""
        if self._world is not None:
            self._pending = None
            self._rec.abandon(reason)
            self._close()
            raise RecordError(
                f"{message}: {self.run_dir} stays readable up to its last commit and is "
                "marked aborted"
            )
        self._flush_pending()
        if self._step - 1 > self._snapshot_step:
            before = self._before if self._stepped else None
            self._rec.weights(*self._unpack(self._weights(before)))
        self._rec.abort(reason)
        self._close()
        raise RecordError(
            f"{message}: {self.run_dir} stays readable up to its last commit and is marked "
            "aborted"
        )

    def _optimizer_step(self) -> None:
        if self._stepped:
            return  # follow_optimizer(): the optimizer has taken the step
        self._in_step = True
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        finally:
            self._in_step = False

    def _outside_step(self, optimizer, args, kwargs) -> None:
        """The optimizer is about to step outside :meth:`step` after the
        run's first step (without :meth:`follow_optimizer`): its update
        would have no records, and the trace would not add up. The run
        stops at the weights before it, and the step is not taken."""
        if self._in_step or self._following or self._closed or self._rec is None:
            return
        reason = (f"the optimizer was stepped outside tracer.step() after step "
                  f"{self._step - 1}")
        self._stop(reason, f"{reason}: an update the run has no records of; call "
                           "tracer.step(loss, ids, labels) in place of optimizer.step(), or "
                           "tracer.follow_optimizer() with tracer.batch(ids, labels)")

    def _record_skipped(self, due, ids, labels, lr, finite: bool = True) -> None:
        """A step the gradient scaler skips: a `steps` row marked skipped,
        the examples, no update."""
        _, batch, value, examples = self._fetch(due, finite=finite)
        self._flush_pending()
        if self._owner:
            self._rec.step(self._step, self._epoch, lr, batch, value, skipped=True)
        if examples is not None:
            self._rec.examples(self._step, self._epoch, ids, labels, *examples)
        self._optimizer_step()

    def _record_instance(self, due, ids, labels, lr) -> None:
        layers = []
        for l in self._layers:
            h = self._hyper(l)
            u, g = self._raw_factors(l)
            if self._world is not None:
                # DDP applies the mean of the ranks' gradients: each rank's
                # examples enter the update divided by the world size.
                g = g * (1.0 / self._world.size)
            precision = _lowest(_precision(d) for d in l.dtypes)
            layers.append((l, h, u, g, precision, self._check_terms(l, u, g)))
        # One synchronisation for the checks of every layer, the loss and
        # the examples.
        terms = [t for *_, t in layers if t is not None]
        flat, batch, value, examples = self._fetch(due, terms)
        precisions = [precision for *_, precision, t in layers if t is not None]
        verdicts = iter(_reptrace.check_verdicts(
            np.ascontiguousarray(flat, dtype=np.float64), [len(t) for t in terms],
            [CHECK_TOLERANCE[p] for p in precisions], _SCALE_SNAP) if terms else ())
        factors, rows = [], []
        for l, h, u, g, precision, t in layers:
            if t is None:
                scale, check, norm = 1.0, None, None
            else:
                scale, check, norm = self._verdict(l, next(verdicts), precision)
            if self._adam is not None:
                if precision != "f32":
                    raise _Refusal(
                        f"layer {l.name!r} at step {self._step}: {type(self.optimizer).__name__} "
                        f"under autocast ({precision}) is not traced in instance mode yet (its "
                        "rounding is not bounded by verify); train in float32 or record in "
                        "batch mode (mode='batch')")
                # v = −κ·δ: Adam's step size and preconditioner are in layer_steps.
                factor = -scale
            else:
                if h["lr"] == 0.0:
                    scale = 1.0
                factor = -h["lr"] * scale
            factors.append((l.name, *self._factors(l, u, g, factor)))
            rows.append((l.name, l.group, h["lr"], h["momentum"], h["dampening"],
                         h["nesterov"], h["weight_decay"], scale, check, norm, precision))
        if self._adam is not None:
            self._record_adam(batch, value, ids, labels, examples, lr, rows, factors)
            return
        self._flush_pending()
        if self._owner:
            self._rec.step(self._step, self._epoch, lr, batch, value)
        if examples is not None:
            self._rec.examples(self._step, self._epoch, ids, labels, *examples)
        if self._owner:
            self._rec.layer_steps(self._step, self._epoch, rows)
        self._hand_over(self._step, self._epoch, ids, labels, _to_host(factors))
        self._optimizer_step()

    def _check_flat(self, terms) -> torch.Tensor | None:
        """The gradient check's terms of every layer (:meth:`_check_terms`)
        as one float64 vector on the device, None without any. Under torch.distributed the
        records' terms (``f``, ``m``) are summed over the ranks, so that the
        applied gradient (the same on every rank: rank 0's copy is kept) is
        checked against every rank's records together; every rank then
        reaches the same verdict."""
        if not terms:
            return None
        if self._world is None:
            if all(isinstance(t, np.ndarray) for t in terms):
                return np.concatenate(terms)
            device = next(t.device for t in terms if isinstance(t, torch.Tensor))
            return torch.cat([torch.from_numpy(t).to(device) if isinstance(t, np.ndarray)
                              else t.double() for t in terms])
        parts = []
        for t in terms:
            c = (len(t) - 1) // 3
            t = t.double()
            if self._world.owner:
                parts.append(t)
            else:
                zero = torch.zeros(1, dtype=t.dtype, device=t.device)
                parts += [zero.expand(c), t[c:3 * c], zero]
        flat = torch.cat(parts)
        self._world.sum_(flat)
        return flat

    def _record_adam(self, batch, value, ids, labels, examples, lr, rows, factors) -> None:
        """The rest of an Adam/AdamW step in instance mode: the optimizer
        steps, then each traced layer's step size and preconditioner are read
        from its state (:meth:`_adam_steps`) and the applied change is checked
        against them; only then is the step written (a refused step leaves
        the run at the weights from before it)."""
        host = _to_host(factors)  # the copy runs while the optimizer steps
        if self._stepped:
            before = self._before
        else:
            before = [[p.detach().clone() for _, p in l.params()] for l in self._layers]
        self._optimizer_step()
        try:
            adam, d = self._adam_steps(before, rows)
        except _Refusal:
            self._before, self._stepped = before, True  # _stop snapshots W_t
            raise
        self._flush_pending()
        if self._owner:
            self._rec.step(self._step, self._epoch, lr, batch, value)
        if examples is not None:
            self._rec.examples(self._step, self._epoch, ids, labels, *examples)
        self._hand_over(self._step, self._epoch, ids, labels, host, (rows, adam, d))

    def _adam_steps(self, before, rows):
        """Per traced layer, Adam's ``(β₁, step size)`` of this step and its
        preconditioner ``D = 1/(sqrt(v/(1−β₂^k)) + ε)`` (float64 on the
        device, copied off it as float32 asynchronously), read from the
        optimizer's state after the step (``state["step"]`` k, ``exp_avg_sq``
        or ``max_exp_avg_sq`` with amsgrad), with the producer check: the
        applied change ``W_{t+1} − d_t·W_t`` (``d_t = 1 − lr·wd`` under
        decoupled decay) must equal ``−step_size·D ⊙ exp_avg`` within float32
        rounding (one synchronisation for every layer). Returns
        ``([(β₁, step size)], host copy of the D's)``."""
        opt = self.optimizer
        scalars, ds, meta = [], [], []
        for l, old, row in zip(self._layers, before, rows):
            g = opt.param_groups[l.group]
            beta1, lr = float(g["betas"][0]), float(g["lr"])
            parts, checks, steps = [], [], []
            for (_, p), w0 in zip(l.params(), old):
                st = opt.state.get(p, {})
                pg = opt.param_groups[self._param_group[id(p)]]
                if "exp_avg" not in st:
                    raise _Refusal(
                        f"layer {l.name!r} at step {self._step}: {type(opt).__name__} kept no "
                        "state for its parameters after the step (no gradient reached them?)"
                    )
                dev = p.device
                k = st["step"].to(dev, torch.float64) if isinstance(st["step"], torch.Tensor) \
                    else torch.tensor(float(st["step"]), dtype=torch.float64, device=dev)
                beta2, eps = float(pg["betas"][1]), float(pg["eps"])
                v = st["max_exp_avg_sq"] if pg.get("amsgrad") else st["exp_avg_sq"]
                dd = 1.0 / (torch.sqrt(v.detach().double() / (1.0 - beta2 ** k)) + eps)
                step_size = lr / (1.0 - beta1 ** k)
                decay = 1.0 - lr * float(pg["weight_decay"]) if self._adam == "adamw" else 1.0
                after, prior = p.detach().double(), w0.double()
                expected = -step_size * dd * st["exp_avg"].detach().double()
                diff = (after - decay * prior) - expected
                sq = lambda x: torch.linalg.vector_norm(x).square()  # noqa: E731
                checks.append(torch.stack([sq(diff), sq(expected), sq(after) + sq(prior)]))
                parts.append(dd.reshape(-1))
                steps.append(k.reshape(1))
            scalars.append(torch.cat([torch.cat(steps), torch.stack(checks).sum(0)]))
            ds.append((l.name, torch.cat(parts).float(), None))
            meta.append((beta1, lr, len(steps)))
        # One synchronisation for the step counts and checks of every layer.
        flat = torch.cat([s.to(scalars[0].device) for s in scalars]).cpu().numpy()
        adam, at = [], 0
        for l, (beta1, lr, n) in zip(self._layers, meta):
            ks, (err2, exp2, w2) = flat[at:at + n], flat[at + n:at + n + 3]
            at += n + 3
            if len(set(ks.tolist())) > 1:
                raise _Refusal(
                    f"layer {l.name!r} at step {self._step}: {type(opt).__name__} counts "
                    f"different steps for its weight and bias ({', '.join(map(str, ks))}); "
                    "a record holds one update of the whole layer"
                )
            k = float(ks[0])
            # What rounding in the parameters' type allows (unit roundoff u:
            # 2⁻²⁴ in float32): the update's own computation, relative to it,
            # and the rounding of d_t·W_t and of W_{t+1}, relative to W.
            u = torch.finfo(l.weight.dtype).eps / 2
            allowed = (max(CHECK_TOLERANCE["f32"], 64 * u) * math.sqrt(exp2)
                       + 4 * u * math.sqrt(w2))
            if not math.sqrt(err2) <= allowed:
                raise _Refusal(
                    f"layer {l.name!r} at step {self._step}: the change {type(opt).__name__} "
                    f"applied differs from −step_size·D ⊙ exp_avg by {math.sqrt(err2):.3g} "
                    f"(allowed {allowed:.3g}): the optimizer does not take torch.optim."
                    f"{'AdamW' if self._adam == 'adamw' else 'Adam'}'s step, which cannot "
                    "be traced in instance mode; record in batch mode (mode='batch')"
                )
            adam.append((beta1, lr / (1.0 - beta1 ** k)))
        return adam, _to_host(ds)

    def _record_batch(self, due, ids, labels, lr) -> None:
        _, batch, value, examples = self._fetch(due)
        self._flush_pending()
        if self._owner:
            self._rec.step(self._step, self._epoch, lr, batch, value)
        if examples is not None:
            self._rec.examples(self._step, self._epoch, ids, labels, *examples)
        if self._stepped:
            before = self._before
        else:
            before = [[p.detach().clone() for _, p in l.params()] for l in self._layers]
        self._optimizer_step()
        if not self._owner:
            # The whole update is the same on every rank: rank 0 records it.
            self._hand_over(self._step, self._epoch, ids, labels, _to_host([]))
            return
        deltas = []
        for l, old in zip(self._layers, before):
            parts = [
                (p.detach().double() - o.double()).reshape(-1)
                for (_, p), o in zip(l.params(), old)
            ]
            deltas.append(torch.cat(parts).float())
        host = _to_host([(l.name, d, None) for l, d in zip(self._layers, deltas)])
        self._hand_over(self._step, self._epoch, ids, labels, host)

    def _raw_factors(self, l: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, δ) of every example of the step, rows = examples, by the
        layer's kind (:meth:`_kinds.Kind.raw`): the input as the layer used
        it (cast to the precision it ran in under autocast) and the gradient
        at its output; the calls of one forward pass are positions of one
        record, the passes (micro-batches) follow each other."""
        us, gs = [], []
        for calls in l.calls:
            parts = []
            for k in calls:
                x = l.inputs[k]
                out = l.dtypes[k]
                if x.is_floating_point() and out in _PRECISION and x.dtype != out:
                    x = x.to(out)  # what autocast fed the layer
                parts.append(l.kind.raw(l.spec, x, l.grads[k].float()))
            if len(parts) == 1:
                us.append(parts[0][0])
                gs.append(parts[0][1])
            else:
                us.append(torch.cat([u for u, _ in parts], dim=1))
                gs.append(torch.cat([g for _, g in parts], dim=1))
        if len(us) == 1:
            return us[0], gs[0]
        if l.kind.sequence and len({int(u.shape[1]) for u in us}) > 1:
            # Micro-batches of a ragged layer padded to different lengths:
            # zero-gradient positions fill them to the longest, and are
            # left out of the records (_drop_zero_positions).
            t = max(int(u.shape[1]) for u in us)
            us = [F.pad(u, (0, 0) * (u.dim() - 2) + (0, t - int(u.shape[1]))) for u in us]
            gs = [F.pad(g, (0, 0) * (g.dim() - 2) + (0, t - int(g.shape[1]))) for g in gs]
        return torch.cat(us), torch.cat(gs)

    def _check_terms(self, l: _Layer, u: torch.Tensor, g: torch.Tensor):
        """The gradient check's terms for one layer, on the device (no
        synchronisation), or None when the check is off.

        The gradient the optimizer is about to apply, ``[∇W | ∇b]``, is
        compared with the sum of the step's per-example gradients
        ``Σ_i g_i [u_i | 1]ᵀ`` along a random direction ``r`` drawn each
        step: ``a = ∇W r_w + r_b ∇b`` against ``f = Σ_i g_i (u_i·r_w + r_b)``
        (matrix-vector products instead of a second weight gradient).
        Returns ``[a, f, m, ‖(∇W, ∇b)‖²]`` (one vector) with
        ``m = Σ_i |g_i| |u_i·r_w + r_b|`` the magnitude of the summed terms,
        which the relative difference is taken against; :meth:`_verdict`
        compares them in float64 on the host. A float32 linear layer on the
        CPU (outside torch.distributed), or a convolution of one group, gets
        them from one call into the extension, as a float64 NumPy array, its
        direction drawn there; any other from PyTorch operations on its
        device (float32)."""
        gw = l.weight.grad
        gb = l.bias_param.grad if l.bias else None
        if gw is None or (l.bias and gb is None):
            raise _Refusal(
                f"layer {l.name!r} at step {self._step}: no .grad on its parameters right "
                "before the optimizer step (set to None after backward()?)"
            )
        if not self._check:
            return None
        host = _ON_HOST and self._world is None and gw.device.type == "cpu" and all(
            t is None or t.dtype == torch.float32 for t in (gw, gb, u, g))
        if host and (l.kind.name == "linear" or (l.kind.name in ("conv2d", "conv1d")
                                                 and l.spec.get("groups", 1) == 1)):
            # A float32 Linear or convolution on the CPU: the same terms in
            # one call into the extension instead of some twenty small
            # PyTorch operations. Linear: one position per row; conv: u is
            # (examples, C_in·kernel, positions), g (examples, C_out, positions).
            # (u and δ are detached already: the hooks keep them so.)
            self._draws += 1
            w = (gw if gw.dim() == 2 else l.kind.rows(gw)).detach().contiguous().numpy()
            u, g = u.contiguous().numpy(), g.contiguous().numpy()
            if l.kind.name == "linear":
                u, g = u.reshape(-1, w.shape[1], 1), g.reshape(-1, w.shape[0], 1)
            return _reptrace.check_terms(
                w, None if gb is None else gb.detach().contiguous().numpy().reshape(-1),
                u, g, self._draws)
        gw = l.kind.rows(gw.detach()).float()
        n_in = gw.shape[1]
        if self._generator is None or self._generator.device != gw.device:
            self._generator = torch.Generator(device=gw.device).manual_seed(0x7E9)
        r = torch.randn(n_in + 1, generator=self._generator, device=gw.device)
        rw = r[:n_in]
        applied = gw @ rw
        norm2 = torch.linalg.vector_norm(gw).square()
        if l.bias:
            gb = gb.detach().reshape(-1).float()
            applied = applied + r[n_in] * gb
            norm2 = norm2 + torch.linalg.vector_norm(gb).square()
        rec, mag = l.kind.check_products(l.spec, u, g, rw, r[n_in] if l.bias else None)
        return torch.cat([applied, rec, mag, norm2.reshape(1)])

    def _verdict(self, l: _Layer, verdict: tuple, precision: str):
        """``(κ, relative difference, ‖(∇W, ∇b)‖)`` from the layer's
        verdict (``_reptrace.check_verdicts`` over the step's terms, in
        float64: :meth:`_check_terms`); raises :class:`_Refusal` when the
        applied gradient and the records differ by more than one scale.
        ``κ`` stays 1 unless a scale explains the difference better than
        rounding does; then it is the step's shared scale (clipping by the
        global norm and loss scaling scale every layer alike) unless the
        layer's own least-squares scale ``a·f / f·f`` explains it clearly
        better. A layer whose per-example gradients nearly cancel (a
        classifier head over balanced classes) fits its own scale only to
        rounding; the shared one, dominated by well-conditioned layers, is
        its exact value."""
        scale, relative, norm, problem = verdict
        if problem == "not finite":
            raise _Refusal(
                f"layer {l.name!r} at step {self._step}: the gradient holds inf or NaN "
                "(use a torch.amp.GradScaler through Tracer(scaler=...), or lower the lr)"
            )
        if problem:
            tol = CHECK_TOLERANCE[precision]
            raise _Refusal(
                f"layer {l.name!r} at step {self._step}: the gradient the optimizer is about "
                f"to apply differs from the sum of the recorded per-example gradients by "
                f"{relative:.3g} (relative, {precision}; tolerance {tol:g}) beyond one scale "
                "factor: something edits gradients between backward() and the step "
                "(value clipping, noise, a gradient hook), which cannot be traced"
            )
        return scale, relative, norm

    def _factors(self, l: _Layer, u: torch.Tensor, g: torch.Tensor, factor: float):
        """(u, v, scale) of one layer for the step, on the device, rows =
        examples: ``v = factor·g`` (``−lr·κ·δ``) or the full per-example
        update, and scale None; or, for float32 factors on the CPU that the
        layer's kind stores as they are, ``v = g`` and scale ``factor``,
        which the recorder multiplies in as it copies them (the same
        float32 products, one tensor operation less per layer and step)."""
        if (_ON_HOST and g.dtype == torch.float32 and g.device.type == "cpu"
                and l.kind.stores_v(l.spec)):
            return (*l.kind.record(l.spec, l.bias, u, g), factor)
        return (*l.kind.record(l.spec, l.bias, u, g * factor), None)

    def _hand_over(self, step, epoch, ids, labels, host, *adam) -> None:
        """The step's records for the recorder (:meth:`_flush_pending`): at
        once when they are on the host, one step later while their copy off
        a GPU is in flight (it then overlaps the next step). Nothing held
        for later shares memory with the program's tensors: a loop that
        reuses a buffer (its inputs, its ids) or a layer fed a view of a
        parameter would change it in place before the records are written."""
        if host.in_flight:
            self._pending = (step, epoch, np.array(ids), np.array(labels), host, *adam)
        else:
            self._pending = (step, epoch, ids, labels, host, *adam)
            self._flush_pending()

    def _flush_pending(self) -> None:
        """Hands the previous step's factors to the recorder: their copies
        off the device ran while this step computed (under Adam also its
        layer_steps rows, with the preconditioners copied off the device)."""
        if self._pending is None:
            return
        step, epoch, ids, labels, host, *adam = self._pending
        self._pending = None
        arrays = host.wait()
        if adam and self._owner:
            rows, scalars, d = adam[0]
            ds = [x for _, x, _ in d.wait()]
            self._rec.layer_steps(step, epoch, rows, adam=[
                (beta1, step_size, np.ascontiguousarray(x.reshape(-1), dtype=np.float32))
                for (beta1, step_size), x in zip(scalars, ds)])
        if self.mode == "instance":
            for name, u, v, scale in arrays:
                if v.ndim == 3:  # a ragged layer's factors: (examples, T, values)
                    u, v, positions = _drop_zero_positions(u, v)
                    self._rec.updates(name, step, epoch, ids, labels, u, v,
                                      positions=positions)
                else:  # v = scale·δ when scale is given (Tracer._factors)
                    self._rec.updates(name, step, epoch, ids, labels,
                                      u.reshape(-1), v.reshape(-1), scale=scale)
        else:
            names = [name for name, _, _ in arrays]
            deltas = [d.reshape(-1) for _, d, _ in arrays]
            self._rec.batch_step(step, epoch, ids, labels, names, deltas)

    # ------------------------------------------------------------ commits

    def end_epoch(self) -> None:
        """Ends an epoch: a weights snapshot and a commit (everything so far
        becomes durable and visible to readers)."""
        self.commit()
        self._epoch += 1

    def commit(self) -> None:
        """A commit point with a weights snapshot, without ending the epoch."""
        if self._closed:
            raise RecordError(f"{self.run_dir}: the tracer is finished")
        if self._rec is None:
            return
        self._flush_pending()
        if self._world is not None:
            self._commit_world(lambda: self._rec.weights(*self._unpack(self._weights())))
            self._snapshot_step = self._step - 1
            return
        self._rec.weights(*self._unpack(self._weights()))
        self._snapshot_step = self._step - 1
        self._rec.commit()
        # The commit is done when this returns: durable and visible.
        self._rec.flush()

    def _commit_world(self, before, finish=None):
        """A collective commit: every rank other than 0 makes its part
        files durable and sends their entries to rank 0, which runs
        ``before`` (the weights snapshot), lists them with its own in one
        commit (``finish``: ``rec.finish`` with the final weights, instead
        of a commit) and tells every rank how it went; a failure is raised
        on every rank, the run left at its previous commit. Returns the
        manifest as JSON with ``finish``."""
        world = self._world
        staged, problem = "[]", None
        if not world.owner:
            try:
                staged = self._rec.stage()
            except Exception as e:
                problem = f"rank {world.rank}: {e}"
        gathered = world.gather((staged, problem))
        outcome = None
        if world.owner:
            problems = [p for _, p in gathered if p is not None]
            try:
                if problems:
                    raise RecordError(problems[0])
                for files, _ in gathered[1:]:
                    self._rec.adopt(files)
                before()
                if finish is None:
                    self._rec.commit()
                    self._rec.flush()
                    outcome = (None, None)
                else:
                    outcome = (None, finish())
            except Exception as e:
                outcome = (f"{e}", None)
        problem, manifest = world.broadcast(outcome)
        if problem is not None:
            self._pending = None
            if self._rec is not None and self._rec.is_open:
                self._rec.abandon(f"commit failed: {problem}")
            self._close()
            raise RecordError(
                f"torch.distributed commit failed: {problem}; {self.run_dir} stays at its "
                "last commit"
            )
        return manifest

    def finish(self, probes=None) -> dict:
        """Writes the final weights and, if given, the probes
        (``(inputs, labels)`` or ``(inputs, labels, ids)``), and marks the run
        complete. Returns the manifest."""
        if self._closed:
            raise RecordError(f"{self.run_dir}: the tracer is finished")
        if self._rec is None:
            raise RecordError(f"{self.run_dir}: no step was recorded")
        self._flush_pending()
        if probes is not None:
            self.add_probes(*probes)
        if self._world is not None:
            final = self._unpack(self._weights()) if self._owner else None
            manifest = self._commit_world(lambda: None,
                                          finish=lambda: self._rec.finish(*final))
            if not self._owner:
                self._rec.abandon("finished")  # a worker's last files are staged
            self._close()
            return json.loads(manifest)
        manifest = self._rec.finish(*self._unpack(self._weights()))
        self._close()
        return json.loads(manifest)

    def abort(self, reason: str) -> None:
        """Stops recording: what is pending is committed and the run is marked
        aborted with ``reason``."""
        if self._rec is not None and not self._closed:
            if self._world is not None:
                # No collective here (another rank may be gone): the run
                # stays at its last commit, marked aborted by rank 0.
                self._pending = None
                self._rec.abandon(reason)
            else:
                self._flush_pending()
                self._rec.abort(reason)
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._raise_threads()
        self._clear()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------ probes

    def add_probes(self, inputs, labels, ids=None, *, train: bool = False, batch_size: int = 256,
                   mask=None):
        """Records probes: each traced layer's input ``a`` for every input in
        the trained network (evaluation mode), its refinement
        ``p = (W_T − W_0) ⊛ a + (b_T − b_0)`` and the network's prediction.
        ``ids`` default to new ids after every instance id seen; ``train=True``
        marks the inputs as training instances (probe id = instance id).
        ``inputs`` is a tensor (the model's one argument) or a dict of
        tensors (a tokenizer's batch, passed to the model by keyword).
        ``mask`` (inputs × sequence length, true at real tokens; default:
        the dict's ``attention_mask``) leaves the padded positions out of
        the probes of the layers that see the sequence; without it a probe
        holds every position of its input.
        Before :meth:`finish` the probes go into the run's final commit;
        after it they are added to the completed run (:func:`add_probes`).
        Returns the probe ids."""
        if self._closed:
            if self._rec is None:
                raise RecordError(f"{self.run_dir}: no step was recorded")
            if not self._owner:
                raise InvalidInput(
                    f"add_probes() after finish() on rank {self._world.rank}: probes are added "
                    "to a finished distributed run by rank 0 alone"
                )
            return add_probes(self.run_dir, self.model, inputs, labels, ids,
                              train=train, batch_size=batch_size, mask=mask)
        if self._rec is None:
            raise RecordError(f"{self.run_dir}: probes are added after the first step")
        self._flush_pending()
        labels = _ints(labels, np.int32, "labels")
        if self._world is not None:
            # Every rank saw other instances: ids above all of them.
            self._max_id = self._world.max(self._max_id)
        if ids is None:
            ids = np.arange(self._max_id + 1, self._max_id + 1 + len(labels), dtype=np.int64)
        if not self._owner:
            # Rank 0 records the probes of a distributed run.
            return [int(i) for i in _ints(ids, np.int64, "ids")]
        initial = {}
        for l in self._layers:
            w0 = self._w0[f"{l.name}.weight"]
            b0 = self._w0.get(f"{l.name}.bias") if l.bias else None
            initial[l.name] = (w0, b0)
        ids = _record_probes(self.model, self._layers, initial, inputs, labels, ids, train,
                             batch_size, self._rec.probes, mask)
        if len(ids):
            self._max_id = max(self._max_id, int(ids.max()))
        return [int(i) for i in ids]

    # ------------------------------------------------------------ context

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self._closed:
            self.abort(f"{exc_type.__name__}: {exc}")
        return False


def add_probes(run_dir, model: nn.Module, inputs, labels, ids=None, *, train: bool = False,
               batch_size: int = 256, mask=None) -> list[int]:
    """Adds probes to a completed run, at any time after training: each
    traced layer's input ``a`` for every input in ``model`` (evaluation
    mode), its refinement ``p = (W_T − W_0) ⊛ a + (b_T − b_0)`` against the
    run's initial weights, and the prediction, committed as one new commit
    without touching anything already in the run.

    ``model`` is the trained model: its traced layers (found by the run's
    qualified layer names) must hold the run's final weights. ``ids`` default
    to new ids above every probe and instance id of the run; ``train=True``
    marks the inputs as training instances (probe id = instance id);
    ``mask`` leaves padded positions out (:meth:`Tracer.add_probes`).
    Returns the probe ids."""
    run_dir = Path(run_dir)
    appender = _reptrace.ProbeAppender(str(run_dir))
    try:
        manifest = json.loads(appender.manifest())
        specs = [m for m in manifest["model"]["modules"]
                 if m.get("kind") in _kinds.BY_NAME and m.get("traced")]
        modules = dict(model.named_modules())
        traceable = [n for n, m in modules.items() if _kinds.of(m) is not None]
        initial = _reptrace.layer_weights(str(run_dir), "initial")
        final = _reptrace.layer_weights(str(run_dir), "final")
        layers = []
        for spec in specs:
            name = spec["name"]
            m = modules.get(name)
            want = _kinds.BY_NAME[spec["kind"]].module
            if not isinstance(m, want):
                found = "not a module of the model" if m is None else f"a {type(m).__name__}"
                raise InvalidInput(
                    f"{run_dir}: traced layer {name!r} ({want.__name__}) is {found}; the "
                    f"model's {_kinds.SHORT_NAMES} modules: {', '.join(traceable) or 'none'}"
                )
            layer = _Layer(name, m)
            layer.spec = spec
            w, b = final[name]
            mine = layer.weight.detach().to("cpu", torch.float64).reshape(-1)
            theirs = torch.from_numpy(w)
            if mine.shape != theirs.shape:
                raise InvalidInput(
                    f"{run_dir}: layer {name!r} has {mine.numel()} weights in the model and "
                    f"{theirs.numel()} in the run: not the model that was trained"
                )
            diff = float((mine - theirs).abs().max()) if mine.numel() else 0.0
            if layer.bias:
                bias = layer.bias_param.detach().to("cpu", torch.float64).reshape(-1)
                if bias.shape == torch.from_numpy(b).shape:
                    diff = max(diff, float((bias - torch.from_numpy(b)).abs().max()))
                else:
                    diff = math.inf
            if diff != 0.0:
                raise InvalidInput(
                    f"{run_dir}: layer {name!r} of the model differs from the run's final "
                    f"weights (max |Δ| {diff:.3g}): probes are taken in the trained model "
                    "(load weights/final.safetensors into it first)"
                )
            w0, b0 = initial[name]
            layers.append(layer)
            initial[name] = (w0, b0 if layer.bias else None)
        labels = _ints(labels, np.int32, "labels")
        if ids is None:
            start = appender.next_probe_id()
            ids = np.arange(start, start + len(labels), dtype=np.int64)
        ids = _record_probes(model, layers, initial, inputs, labels, ids, train, batch_size,
                             appender.probes, mask)
        appender.commit()
    finally:
        appender.discard()
    return [int(i) for i in ids]


def _record_probes(model, layers, initial, inputs, labels, ids, train, batch_size, emit,
                   mask=None):
    """Runs ``inputs`` through ``model`` (evaluation mode, no gradients) in
    chunks and hands each traced layer's probe rows to ``emit`` (the
    recorder's or an appender's ``probes``). ``initial``: layer name →
    (flat W_0, flat b_0 or None); ``mask``: inputs × sequence length, true
    at the positions ragged layers keep. Returns the probe ids."""
    n = len(labels)
    keyword = isinstance(inputs, Mapping)
    if keyword:  # a tokenizer's batch: the model takes it by keyword
        if not inputs or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
            raise InvalidInput("probes: a dict of inputs must map names to tensors")
        if mask is None:
            mask = inputs.get("attention_mask")
    sizes = {int(v.shape[0]) for v in inputs.values()} if keyword else {int(inputs.shape[0])}
    if sizes != {n}:
        got = " or ".join(str(s) for s in sorted(sizes))
        raise InvalidInput(f"probes: {got} inputs and {n} labels")
    ids = _ints(ids, np.int64, "ids")
    if len(ids) != n:
        raise InvalidInput(f"probes: {len(ids)} ids for {n} inputs")
    if mask is not None:
        mask = torch.as_tensor(mask).detach().cpu()
        if mask.dim() != 2 or int(mask.shape[0]) != n:
            raise InvalidInput(
                f"probes: mask of shape {tuple(mask.shape)} for {n} inputs; expected "
                "(inputs, sequence length), true at real tokens"
            )
        mask = mask != 0
    was_training = model.training
    captured: dict[int, list[torch.Tensor]] = {}

    def keep(module, inputs_, output):
        captured.setdefault(id(module), []).append(inputs_[0].detach())

    hooks = [l.module.register_forward_hook(keep) for l in layers]
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
                captured.clear()
                if keyword:
                    out = model(**{k: v[start:end].to(device) for k, v in inputs.items()})
                else:
                    out = model(inputs[start:end].to(device))
                if not isinstance(out, torch.Tensor):  # a ModelOutput or a dict with logits
                    out = out["logits"]
                predicted = out.argmax(dim=1).to("cpu", torch.int32).numpy()
                for l in layers:
                    a, p = _probe(l, captured.get(id(l.module), []), initial[l.name], end - start)
                    rows = end - start
                    extra = {}
                    if l.spec.get("ragged"):
                        keep = None if mask is None else mask[start:end]
                        a, p, extra["positions"] = _probe_positions(l, a, p, keep, start)
                    emit(
                        l.name,
                        ids[start:end],
                        ids[start:end] if train else np.full(rows, -1, dtype=np.int64),
                        labels[start:end],
                        np.ascontiguousarray(predicted, dtype=np.int32),
                        np.ascontiguousarray(a.reshape(rows, -1).cpu().numpy().reshape(-1)
                                             if not extra else a.cpu().numpy().reshape(-1)),
                        np.ascontiguousarray(p.reshape(rows, -1).cpu().numpy().reshape(-1)
                                             if not extra else p.cpu().numpy().reshape(-1)),
                        **extra,
                    )
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return ids


def _probe(l: _Layer, calls: list[torch.Tensor], initial, rows: int):
    """A layer's probe ``(a, p)`` for one chunk of inputs (float64, rows =
    inputs) from its calls in the forward pass, against the initial weights."""
    if not calls:
        raise InvalidInput(f"probes: layer {l.name!r} did not run in the model's forward pass")
    if len(calls) > 1 and not l.kind.sequence:
        raise InvalidInput(
            f"probes: layer {l.name!r} ran {len(calls)} times in one forward pass"
        )
    # The weights as the run's snapshots store them (float32), so that p is
    # the refinement under the run's own W_T and W_0 (a float64 model's
    # weights differ from them by their rounding).
    w = l.weight.detach().float().double()
    w0, b0 = initial
    dw = w - torch.as_tensor(w0).to(w.device).double().reshape(w.shape)
    db = None
    if l.bias:
        b = l.bias_param.detach().float().double()
        db = b - torch.as_tensor(b0).to(b.device).double().reshape(b.shape)
    for x in calls:
        if x.dim() == 0 or int(x.shape[0]) != rows:
            raise InvalidInput(
                f"probes: layer {l.name!r} got an input of shape {tuple(x.shape)} for "
                f"{rows} inputs: its first dimension must be the batch"
            )
    parts = [l.kind.probe(l.spec, x, dw, db) for x in calls]
    if len(parts) == 1:
        a, p = parts[0]
    else:
        a = torch.cat([a for a, _ in parts], dim=1)
        p = torch.cat([p for _, p in parts], dim=1)
    if l.kind.sequence and not l.spec.get("ragged"):
        t = sum(l.kind.positions(l.module, x) for x in calls)
        want = l.spec.get("positions", 1)
        if t != want:
            raise InvalidInput(
                f"probes: layer {l.name!r} sees {t} positions per input and the run's records "
                f"{want}: pad probe inputs to the training sequence length"
            )
    return a, p


def _probe_positions(l: _Layer, a: torch.Tensor, p: torch.Tensor, keep, first: int):
    """A ragged layer's probes (inputs × T × values) as kept rows and each
    probe's number of positions: those ``keep`` (inputs × L, the mask's
    chunk; None: all) marks, its L positions repeated for each of the
    layer's calls (T = calls·L). ``first``: the chunk's first input."""
    rows, t = int(a.shape[0]), int(a.shape[1])
    if keep is None:
        return a, p, np.full(rows, t, dtype=np.uint32)
    width = int(keep.shape[1])
    if t % width:
        raise InvalidInput(
            f"probes: mask has {width} positions per input and layer {l.name!r} sees {t}: "
            "give the mask of the model's input sequence"
        )
    keep = keep.repeat(1, t // width).to(a.device)
    positions = keep.sum(dim=1)
    empty = (positions == 0).nonzero()
    if len(empty):
        raise InvalidInput(
            f"probes: input {first + int(empty[0, 0])} has no position left by the mask"
        )
    return a[keep], p[keep], positions.cpu().numpy().astype(np.uint32)


class _HostCopy:
    """Factors being copied off the device: asynchronous into pinned memory
    on CUDA (waited for one step later: ``in_flight``), none on the CPU
    (the recorder copies them when they are handed over, at once), unless
    some are on a GPU: then the CPU ones are copied too, since they are
    handed over a step later."""

    def __init__(self, items):
        self._event = None
        out = []
        cuda = any(t is not None and t.is_cuda for _, a, b, *_ in items for t in (a, b))
        for name, a, b, *scale in items:
            out.append((name, self._copy(a, cuda), self._copy(b, cuda), *scale))
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._items = out

    @staticmethod
    def _copy(t, cuda):
        if t is None:
            return None
        if cuda and t.is_cuda:
            host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host
        if cuda:
            return t.to(torch.float32, copy=True).contiguous()
        return t.to(torch.float32).contiguous()

    @property
    def in_flight(self) -> bool:
        """Whether the copy runs on a GPU still (handed over a step later)."""
        return self._event is not None

    def wait(self):
        if self._event is not None:
            self._event.synchronize()
        return [
            (name, a.numpy() if a is not None else None, b.numpy() if b is not None else None,
             *scale)
            for name, a, b, *scale in self._items
        ]


def _drop_zero_positions(u: np.ndarray, v: np.ndarray):
    """A ragged layer's factors (examples × T × values) without the
    positions whose output gradient ``v_t`` is exactly zero (padding the
    attention and the loss mask out): they add nothing to ``Σ_t v_t u_tᵀ``.
    Returns the kept rows of ``u`` and ``v`` (flat) and each example's
    number of kept positions."""
    keep = np.any(v != 0, axis=2)
    positions = keep.sum(axis=1).astype(np.uint32)
    if bool(keep.all()):
        return u.reshape(-1), v.reshape(-1), positions
    return (np.ascontiguousarray(u[keep]).reshape(-1),
            np.ascontiguousarray(v[keep]).reshape(-1), positions)


def _to_host(items) -> _HostCopy:
    return _HostCopy(items)


class _Due:
    """What the host needs of a step that is still on the device: its loss
    (a tensor, a number, or None for the mean of its examples' losses), its
    examples' loss and predicted class (:meth:`Tracer._examples`), and its
    batch size. :meth:`Tracer._fetch` copies it to the host together with
    the gradient check's terms, in one transfer."""

    def __init__(self, loss, examples, batch: int):
        self.loss = _scalar(loss) if loss is not None else None
        self.examples = examples
        self.batch = batch

    def parts(self) -> list[torch.Tensor]:
        out = []
        if isinstance(self.loss, torch.Tensor):
            out.append(self.loss.reshape(1))
        if self.examples is not None and isinstance(self.examples[0], torch.Tensor):
            out += [self.examples[0].reshape(-1), self.examples[1].reshape(-1)]
        return out

    def decode(self, host: np.ndarray) -> tuple[float, tuple | None]:
        """``(loss, (each example's loss, predicted class) or None)`` from
        the host copy of :meth:`parts`."""
        k = 0
        value = self.loss
        if isinstance(self.loss, torch.Tensor):
            value, k = float(host[0]), 1
        examples = self.examples  # NumPy arrays when computed on the host
        if examples is not None and isinstance(examples[0], torch.Tensor):
            n = int(examples[0].shape[0])
            examples = (np.ascontiguousarray(host[k:k + n], dtype=np.float32),
                        np.ascontiguousarray(host[k + n:k + 2 * n], dtype=np.int32))
        if examples is not None and value is None:
            value = float(np.mean(examples[0], dtype=np.float64)) if len(examples[0]) else 0.0
        return float(value), examples


def _scalar(loss):
    """A loss as given: a one-element tensor (detached, left on its
    device) or a number."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise InvalidInput(
                f"loss: expected a scalar, got a tensor of shape {tuple(loss.shape)}"
            )
        return loss.detach()
    return float(loss)


def _sum_losses(losses):
    """The sum of micro-batch losses (numbers or one-element tensors), on
    the device when any is a tensor, so that no synchronisation is needed."""
    tensors = [x for x in losses if isinstance(x, torch.Tensor)]
    if not tensors:
        return math.fsum(losses)
    device = tensors[0].device
    return torch.stack([
        x.reshape(()).to(device=device, dtype=torch.float64) if isinstance(x, torch.Tensor)
        else torch.tensor(x, dtype=torch.float64, device=device)
        for x in losses
    ]).sum()


def _host(parts: list[torch.Tensor]) -> np.ndarray:
    """Device tensors as one float64 vector on the host, in one copy."""
    if not parts:
        return np.zeros(0)
    device = parts[0].device
    if _ON_HOST and len(parts) == 1 and device.type == "cpu" and parts[0].numel() == 1:
        return np.array([parts[0].item()], dtype=np.float64)  # a CPU loss: no copies
    flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in parts])
    return flat.cpu().numpy()


def _int_tensor(values, dtype, what: str):
    """Integer ids or labels as given: a tensor (detached, left on its
    device) or, for anything else, :func:`_ints`."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise InvalidInput(f"{what}: integers expected, got {values.dtype}")
        return values.detach()
    return _ints(values, dtype, what)


def _ints_together(items) -> list[np.ndarray]:
    """:func:`_ints` of each ``(values, dtype, what)``; the tensors among
    them are copied to the host together, in one transfer."""
    tensors = [(i, _int_tensor(v, dtype, what)) for i, (v, dtype, what) in enumerate(items)
               if isinstance(v, torch.Tensor)]
    out = [None] * len(items)
    if tensors and _ON_HOST and all(t.device.type == "cpu" for _, t in tensors):
        for i, t in tensors:
            out[i] = t.reshape(-1).numpy()
    elif tensors:
        device = tensors[0][1].device
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.int64)
                          for _, t in tensors]).cpu().numpy()
        start = 0
        for i, t in tensors:
            n = t.numel()
            out[i] = flat[start:start + n]
            start += n
    return [_ints(v if out[i] is None else out[i], dtype, what)
            for i, (v, dtype, what) in enumerate(items)]


def _ints(values, dtype, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"{what}: integers expected, got {arr.dtype}")
    return np.ascontiguousarray(arr.reshape(-1), dtype=dtype)
