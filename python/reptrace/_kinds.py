"""The traced layer kinds of the PyTorch tracer, one class each.

A kind is everything the tracer knows of one module type: which modules it
traces and which it refuses (:meth:`Kind.refusal`), its manifest entry
(:meth:`Kind.spec`), the input layout it records (:meth:`Kind.check_input`),
each example's raw factors (:meth:`Kind.raw`: the input ``u`` as the layer
used it and the gradient ``δ`` at its output), the gradient check's
products (:meth:`Kind.check_products`), the record (:meth:`Kind.record`:
the factors, or the full per-example update where that is smaller) and the
probe's refinement ``p = ΔW ⊛ a + Δb`` (:meth:`Kind.refine`). The tracer
(``_torch.py``) only ever talks to a layer through its kind, so adding a
kind is adding a class here (and its counterpart in the Rust crates:
``docs/architecture.md``, "Layer kinds").
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _reptrace


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


class Kind:
    """One traced module type. Subclasses set ``name`` (the manifest's
    ``kind``) and ``module`` (the ``nn.Module`` class they trace)."""

    name: str
    module: type

    def refusal(self, layer: str, m: nn.Module) -> str | None:
        """Why module ``m`` cannot be traced, in one line, or None."""
        return None

    def spec(self, layer: str, m: nn.Module, x: torch.Tensor, mode: str) -> dict:
        """The manifest entry of ``m``, from the input ``x`` of its first
        forward pass."""
        raise NotImplementedError

    def check_input(self, layer: str, x: torch.Tensor) -> str | None:
        """Why input ``x`` cannot be recorded, in one line, or None."""
        return None

    def raw(self, spec: dict, a: torch.Tensor, g: torch.Tensor):
        """``(u, δ)`` of one forward pass, float32, rows = examples."""
        return a, g

    def check_products(self, u: torch.Tensor, g: torch.Tensor, rw: torch.Tensor, rb):
        """The gradient check's products along the random direction
        ``(rw, rb)`` (``rb`` None without a bias): each example's
        ``u·rw + rb`` and then ``Σ_i δ_i (u_i·rw + rb)`` and its magnitude
        ``Σ_i |δ_i| |u_i·rw + rb|``."""
        raise NotImplementedError

    def record(self, spec: dict, bias: bool, u: torch.Tensor, v: torch.Tensor):
        """One step's records ``(u, v)`` from ``u`` and ``v = −lr·κ·δ``,
        rows = examples."""
        raise NotImplementedError

    def refine(self, spec: dict, a: torch.Tensor, dw: torch.Tensor, db):
        """The probe's refinement ``p = ΔW ⊛ a + Δb`` (float64)."""
        raise NotImplementedError


class Linear(Kind):
    """``nn.Linear`` over (batch, features) inputs: ``u = a``, ``v`` the
    output gradient scaled, ``ΔW_i = v_i u_iᵀ``."""

    name = "linear"
    module = nn.Linear

    def spec(self, layer, m, x, mode):
        return {
            "kind": "linear",
            "name": layer,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "traced": True,
        }

    def check_input(self, layer, x):
        if x.dim() != 2:
            return (
                f"layer {layer!r}: input of shape {tuple(x.shape)}; Linear layers "
                "are traced for inputs of shape (batch, features)"
            )
        return None

    def check_products(self, u, g, rw, rb):
        ur = u @ rw  # (B,)
        if rb is not None:
            ur = ur + rb
        return ur @ g, ur.abs() @ g.abs()

    def record(self, spec, bias, u, v):
        return u.contiguous(), v.contiguous()

    def refine(self, spec, a, dw, db):
        return F.linear(a, dw, db)


class Conv2d(Kind):
    """``nn.Conv2d`` (groups 1, zero padding): ``u`` the unfolded input
    (K × P), ``v`` the output gradient (C_out × P) scaled, or the full
    per-example update by its kind's rule (``record_storage``)."""

    name = "conv2d"
    module = nn.Conv2d

    def refusal(self, layer, m):
        if m.groups != 1:
            return f"layer {layer!r}: grouped convolutions (groups={m.groups}) are not traced"
        if m.padding_mode != "zeros":
            return f"layer {layer!r}: padding_mode {m.padding_mode!r}; only 'zeros' is traced"
        if isinstance(m.padding, str) and m.padding != "valid":
            return f"layer {layer!r}: padding={m.padding!r}; give the padding as numbers"
        return None

    def spec(self, layer, m, x, mode):
        kernel, stride, dilation = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        padding = [0, 0] if isinstance(m.padding, str) else _pair(m.padding)
        h, w = int(x.shape[2]), int(x.shape[3])
        out_hw = [
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip((h, w), padding, dilation, kernel, stride)
        ]
        bias = m.bias is not None
        spec = {
            "kind": "conv2d",
            "name": layer,
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel": kernel,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "input_hw": [h, w],
            "output_hw": out_hw,
            "bias": bias,
            "traced": True,
        }
        spec["storage"] = (
            "full" if mode == "batch" else _reptrace.record_storage(json.dumps(spec))
        )
        return spec

    def raw(self, spec, a, g):
        a = F.unfold(a, spec["kernel"], dilation=spec["dilation"], padding=spec["padding"],
                     stride=spec["stride"])
        return a, g.reshape(g.shape[0], spec["out_channels"], -1)

    def check_products(self, u, g, rw, rb):
        ur = torch.einsum("bkp,k->bp", u, rw)  # (B, P)
        if rb is not None:
            ur = ur + rb
        return (torch.einsum("bcp,bp->c", g, ur),
                torch.einsum("bcp,bp->c", g.abs(), ur.abs()))

    def record(self, spec, bias, u, v):
        b = u.shape[0]
        if spec["storage"] == "factors":
            return u.reshape(b, -1), v.reshape(b, -1)
        dw = torch.bmm(v, u.transpose(1, 2)).reshape(b, -1)
        if bias:
            dw = torch.cat([dw, v.sum(dim=2)], dim=1)
        return torch.empty((b, 0), device=u.device), dw

    def refine(self, spec, a, dw, db):
        return F.conv2d(a, dw, db, stride=spec["stride"], padding=spec["padding"],
                        dilation=spec["dilation"])


# Every traced kind; a module is matched by the first whose class it is.
KINDS: tuple[Kind, ...] = (Linear(), Conv2d())
BY_NAME = {k.name: k for k in KINDS}
MODULE_NAMES = " and ".join(f"nn.{k.module.__name__}" for k in KINDS)
ANY_MODULE = " or ".join(f"nn.{k.module.__name__}" for k in KINDS)
SHORT_NAMES = " and ".join(k.module.__name__ for k in KINDS)


def of(m: nn.Module) -> Kind | None:
    """The kind that traces module ``m``, or None."""
    return next((k for k in KINDS if isinstance(m, k.module)), None)
