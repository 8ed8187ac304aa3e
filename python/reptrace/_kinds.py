"""The traced layer kinds of the PyTorch tracer, one class each.

A kind is everything the tracer knows of one module type: which modules it
traces (:meth:`Kind.traces`) and which it refuses (:meth:`Kind.refusal`),
its parameters (:meth:`Kind.params`), its manifest entry (:meth:`Kind.spec`),
the input layout it records (:meth:`Kind.check_input`), each call's raw
factors (:meth:`Kind.raw`: the input ``u`` as the weight multiplies it and the
gradient ``δ`` at the output), the gradient check's products
(:meth:`Kind.check_products`), the record (:meth:`Kind.record`: the factors,
or the full per-example update where that is smaller, by the format's rule)
and the probe (:meth:`Kind.probe`: the stored input ``a`` and the refinement
``p = ΔW ⊛ a + Δb``). The tracer (``_torch.py``) only ever talks to a layer
through its kind, so adding a kind is adding a class here (and its
counterparts in the Rust crates: ``docs/architecture.md``, "Layer kinds").

Sequence kinds (:attr:`Kind.sequence`) see inputs of shape (batch, ...,
features): every position is one application of the weight, and the calls
of a module used several times in one forward pass are further positions
of the same record. Their ``raw`` and ``probe`` tensors are (batch,
positions, ...), concatenated by the tracer along dimension 1. A layer
that sees a sequence is *ragged* (the spec's ``ragged``, format 9): a
step may have any sequence length, and its factor records (returned by
:meth:`Kind.record` as (batch, positions, values)) leave out the positions
whose output gradient is exactly zero (padding), which the tracer drops on
the host.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _reptrace

# A token id is stored as this many base-2048 digits, most significant
# first (exact integers in f16 and f32): reptrace_format::EmbeddingSpec::digits.
_DIGIT = 2048


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _storage(spec: dict, mode: str) -> str:
    """The storage of the layer's records, by the format's rule for its kind."""
    return "full" if mode == "batch" else _reptrace.record_storage(json.dumps(spec))


class Kind:
    """One traced module type. Subclasses set ``name`` (the manifest's
    ``kind``) and ``module`` (the ``nn.Module`` class they trace)."""

    name: str
    module: type
    # Whether inputs are (batch, positions..., features) and repeated calls
    # in one forward pass are further positions of one record.
    sequence = False

    def traces(self, m: nn.Module) -> bool:
        """Whether ``m`` is a module of this kind with a weight to train."""
        return isinstance(m, self.module) and isinstance(getattr(m, "weight", None), torch.Tensor)

    def params(self, m: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """``[("weight", W), ("bias", b)]``, without the bias when there is none."""
        out = [("weight", m.weight)]
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            out.append(("bias", m.bias))
        return out

    def refusal(self, layer: str, m: nn.Module) -> str | None:
        """Why module ``m`` cannot be traced, in one line, or None."""
        return None

    def positions(self, m: nn.Module, x: torch.Tensor) -> int:
        """Positions per example of a call of ``m`` with input ``x`` (sequence kinds)."""
        return 1

    def has_sequence(self, m: nn.Module, x: torch.Tensor) -> bool:
        """Whether input ``x`` has positions between its batch dimension and
        the values each position holds (then the layer is ragged)."""
        return False

    def spec(self, layer: str, m: nn.Module, xs: list[torch.Tensor], mode: str) -> dict:
        """The manifest entry of ``m``, from the inputs ``xs`` of its calls
        in the first forward pass."""
        raise NotImplementedError

    def check_input(self, layer: str, x: torch.Tensor) -> str | None:
        """Why input ``x`` cannot be recorded, in one line, or None."""
        return None

    def rows(self, gw: torch.Tensor) -> torch.Tensor:
        """The weight gradient as a matrix whose rows the check compares."""
        return gw.reshape(gw.shape[0], -1)

    def raw(self, spec: dict, x: torch.Tensor, g: torch.Tensor):
        """``(u, δ)`` of one call, rows = examples (float32 except token ids)."""
        return x.float(), g

    def check_products(self, spec: dict, u, g, rw: torch.Tensor, rb):
        """The gradient check's products along the random direction
        ``(rw, rb)`` (``rb`` None without a bias), one per row of
        :meth:`rows`: ``Σ_i δ_i (u_i·rw + rb)`` and its magnitude
        ``Σ_i |δ_i| |u_i·rw + rb|``."""
        raise NotImplementedError

    def record(self, spec: dict, bias: bool, u, v: torch.Tensor):
        """One step's records ``(u, v)`` from ``u`` and ``v = −lr·κ·δ``
        (``−κ·δ`` under Adam), rows = examples."""
        raise NotImplementedError

    def stores_v(self, spec: dict) -> bool:
        """Whether :meth:`record` stores ``v`` as given (reshaped, one row
        per example), so that it may be scaled after it."""
        return False

    def probe(self, spec: dict, x: torch.Tensor, dw: torch.Tensor, db):
        """``(a, p)`` of one call in float64: the input as stored in a probe
        and the refinement ``p = ΔW ⊛ a + Δb``."""
        raise NotImplementedError


class Linear(Kind):
    """``nn.Linear`` over (batch, ..., features) inputs: ``u`` the input at
    each position, ``v`` the output gradient scaled, ``ΔW_i = Σ_t v_t u_tᵀ``;
    the full per-example update where that is smaller."""

    name = "linear"
    module = nn.Linear
    sequence = True

    def positions(self, m, x):
        return math.prod(int(s) for s in x.shape[1:-1])

    def has_sequence(self, m, x):
        return x.dim() > 2

    def spec(self, layer, m, xs, mode):
        spec = {
            "kind": "linear",
            "name": layer,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "traced": True,
        }
        positions = sum(self.positions(m, x) for x in xs)
        if positions > 1:
            spec["positions"] = positions
            spec["storage"] = _storage(spec, mode)
        if any(self.has_sequence(m, x) for x in xs):
            spec["ragged"] = True
        return spec

    def check_input(self, layer, x):
        if x.dim() < 2:
            return (
                f"layer {layer!r}: input of shape {tuple(x.shape)}; Linear layers are traced "
                "for inputs of shape (batch, ..., features)"
            )
        return None

    def raw(self, spec, x, g):
        b = x.shape[0]
        return x.float().reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])

    def check_products(self, spec, u, g, rw, rb):
        u2, g2 = u.reshape(-1, u.shape[-1]), g.reshape(-1, g.shape[-1])
        ur = u2 @ rw  # (B·T,)
        if rb is not None:
            ur = ur + rb
        return ur @ g2, ur.abs() @ g2.abs()

    def stores_v(self, spec):
        return spec.get("storage", "factors") == "factors" and not spec.get("ragged")

    def record(self, spec, bias, u, v):
        b = u.shape[0]
        if spec.get("storage", "factors") == "factors":
            if spec.get("ragged"):  # (batch, T, values): positions dropped on the host
                return u.contiguous(), v.contiguous()
            return u.reshape(b, -1).contiguous(), v.reshape(b, -1).contiguous()
        dw = torch.bmm(v.transpose(1, 2), u).reshape(b, -1)
        if bias:
            dw = torch.cat([dw, v.sum(dim=1)], dim=1)
        return torch.empty((b, 0), device=u.device), dw

    def probe(self, spec, x, dw, db):
        a = x.double().reshape(x.shape[0], -1, x.shape[-1])
        return a, F.linear(a, dw, db)


def _digits(spec: dict) -> int:
    n = spec["num_embeddings"]
    return 1 if n <= _DIGIT else (2 if n <= _DIGIT ** 2 else 3)


def _encode(ids: torch.Tensor, digits: int) -> torch.Tensor:
    """Token ids (batch, T) as their base-2048 digits (batch, T, digits), float32."""
    parts = [(ids // _DIGIT ** (digits - 1 - j)) % _DIGIT for j in range(digits)]
    return torch.stack(parts, dim=-1).float()


class Embedding(Kind):
    """``nn.Embedding``: an example's update touches only the rows of its
    tokens; its record is sparse: the token ids (as base-2048 digits) and
    the output gradient at each position, scaled."""

    name = "embedding"
    module = nn.Embedding
    sequence = True

    def refusal(self, layer, m):
        if m.sparse:
            return (f"layer {layer!r}: nn.Embedding(sparse=True) is not traced; "
                    "use sparse=False")
        if m.max_norm is not None:
            return (f"layer {layer!r}: nn.Embedding(max_norm=...) renormalises its weight in "
                    "the forward pass, which is not traced")
        if m.scale_grad_by_freq:
            return (f"layer {layer!r}: nn.Embedding(scale_grad_by_freq=True) scales the "
                    "gradient by the batch's token counts, which is not traced")
        return None

    def positions(self, m, x):
        return math.prod(int(s) for s in x.shape[1:])

    def has_sequence(self, m, x):
        return x.dim() > 1

    def spec(self, layer, m, xs, mode):
        spec = {
            "kind": "embedding",
            "name": layer,
            "num_embeddings": m.num_embeddings,
            "embedding_dim": m.embedding_dim,
            "positions": sum(self.positions(m, x) for x in xs),
            "traced": True,
        }
        if m.padding_idx is not None:
            spec["padding_idx"] = int(m.padding_idx)
        spec["storage"] = _storage(spec, mode)
        if any(self.has_sequence(m, x) for x in xs):
            spec["ragged"] = True
        return spec

    def check_input(self, layer, x):
        if x.is_floating_point() or x.is_complex() or x.dim() < 1:
            return (f"layer {layer!r}: input of shape {tuple(x.shape)} and dtype {x.dtype}; "
                    "Embedding layers are traced for integer token ids of shape (batch, ...)")
        return None

    def raw(self, spec, x, g):
        b = x.shape[0]
        ids = x.reshape(b, -1).long()
        g = g.reshape(b, ids.shape[1], -1)
        pad = spec.get("padding_idx")
        if pad is not None:  # PyTorch gives the padding row no gradient
            g = g.masked_fill((ids == pad).unsqueeze(-1), 0.0)
        return ids, g

    def check_products(self, spec, u, g, rw, rb):
        ids = u.reshape(-1)
        s = g.reshape(-1, g.shape[-1])
        n = spec["num_embeddings"]
        rec = torch.zeros(n, device=g.device, dtype=g.dtype).index_add_(0, ids, s @ rw)
        mag = torch.zeros(n, device=g.device, dtype=g.dtype).index_add_(0, ids, s.abs() @ rw.abs())
        return rec, mag

    def record(self, spec, bias, u, v):
        b = u.shape[0]
        if spec["storage"] == "factors":
            ids = _encode(u, _digits(spec))
            if spec.get("ragged"):  # (batch, T, values): positions dropped on the host
                return ids, v.contiguous()
            return ids.reshape(b, -1), v.reshape(b, -1).contiguous()
        dense = torch.zeros((b, spec["num_embeddings"], v.shape[-1]), device=v.device)
        dense.scatter_add_(1, u.unsqueeze(-1).expand(-1, -1, v.shape[-1]), v)
        return torch.empty((b, 0), device=v.device), dense.reshape(b, -1)

    def probe(self, spec, x, dw, db):
        ids = x.reshape(x.shape[0], -1).long()
        return _encode(ids, _digits(spec)).double(), F.embedding(ids, dw)


class _Norm(Kind):
    """A normalisation with elementwise affine parameters: ``y = γ ⊙ x̂ +
    β`` at every position, ``x̂`` the normalised input. Records hold the
    per-example update ``[Δγ, Δβ] = [Σ_t v_t ⊙ x̂_t, Σ_t v_t]`` (always
    smaller than factors); a probe stores ``x̂``."""

    sequence = True

    def _d(self, spec) -> int:
        return math.prod(spec["normalized_shape"])

    def positions(self, m, x):
        return x.numel() // max(1, x.shape[0]) // math.prod(m.normalized_shape)

    def has_sequence(self, m, x):
        return x.dim() > 1 + len(m.normalized_shape)

    def spec(self, layer, m, xs, mode):
        shape = [int(s) for s in m.normalized_shape]
        eps = m.eps if m.eps is not None else torch.finfo(torch.float32).eps
        spec = {
            "kind": self.name,
            "name": layer,
            "normalized_shape": shape,
            "bias": isinstance(getattr(m, "bias", None), torch.Tensor),
            "eps": float(eps),
            "positions": sum(self.positions(m, x) for x in xs),
            "traced": True,
        }
        if any(self.has_sequence(m, x) for x in xs):
            spec["ragged"] = True
        return spec

    def normalise(self, spec, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def raw(self, spec, x, g):
        b, d = x.shape[0], self._d(spec)
        xh = self.normalise(spec, x.float())
        return xh.reshape(b, -1, d), g.reshape(b, -1, d)

    def rows(self, gw):
        return gw.reshape(-1, 1)

    def check_products(self, spec, u, g, rw, rb):
        ur = u * rw[0]
        if rb is not None:
            ur = ur + rb
        return (g * ur).sum(dim=(0, 1)), (g.abs() * ur.abs()).sum(dim=(0, 1))

    def record(self, spec, bias, u, v):
        parts = [(v * u).sum(dim=1)]
        if bias:
            parts.append(v.sum(dim=1))
        return torch.empty((u.shape[0], 0), device=u.device), torch.cat(parts, dim=1)

    def probe(self, spec, x, dw, db):
        b, d = x.shape[0], self._d(spec)
        xh = self.normalise(spec, x.double()).reshape(b, -1, d)
        p = xh * dw.reshape(-1)
        if db is not None:
            p = p + db.reshape(-1)
        return xh, p


class LayerNorm(_Norm):
    """``nn.LayerNorm`` with elementwise affine parameters: ``x̂ = (x −
    mean) / sqrt(var + eps)`` over the normalised dimensions."""

    name = "layer_norm"
    module = nn.LayerNorm

    def normalise(self, spec, x):
        return F.layer_norm(x, spec["normalized_shape"], None, None, spec["eps"])


class RMSNorm(_Norm):
    """``nn.RMSNorm`` with its elementwise weight: ``x̂ = x / sqrt(mean(x²)
    + eps)`` over the normalised dimensions."""

    name = "rms_norm"
    module = nn.RMSNorm

    def normalise(self, spec, x):
        return F.rms_norm(x, spec["normalized_shape"], None, spec["eps"])


def _unfold(a: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """``F.unfold`` of a 4-d input (the same values, bit for bit), as one
    copy of a strided view of it: (B, C·kh·kw, H'·W'). Several times faster
    than ``F.unfold`` on a CPU (2.5-6x for the test CNN's layers)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    b, c, h, w = a.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_b, s_c, s_h, s_w = a.stride()
    view = a.as_strided((b, c, kh, kw, ho, wo),
                        (s_b, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w))
    return view.reshape(b, c * kh * kw, ho * wo)


class _Conv(Kind):
    """A convolution over ``n`` spatial dimensions (any groups, padding
    mode): ``u`` the unfolded input (K × P, K = C_in·∏kernel), ``v`` the
    output gradient (C_out × P) scaled, ``ΔW`` per group ``V_g U_gᵀ``; the
    full per-example update where that is smaller."""

    n: int

    def refusal(self, layer, m):
        if isinstance(m.padding, str) and m.padding != "valid":
            return f"layer {layer!r}: padding={m.padding!r}; give the padding as numbers"
        return None

    def _geometry(self, m, x) -> dict:
        kernel = [int(k) for k in m.kernel_size]
        stride = [int(s) for s in m.stride]
        dilation = [int(d) for d in m.dilation]
        padding = [0] * self.n if isinstance(m.padding, str) else [int(p) for p in m.padding]
        size = [int(s) for s in x.shape[2:]]
        out = [
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(size, padding, dilation, kernel, stride)
        ]
        return {"kernel": kernel, "stride": stride, "padding": padding,
                "dilation": dilation, "size": size, "out": out}

    def _extras(self, spec: dict, m) -> None:
        if m.groups != 1:
            spec["groups"] = int(m.groups)
        if m.padding_mode != "zeros":
            spec["padding_mode"] = m.padding_mode

    # The spec's geometry as 2-d lists (a Conv1d is a Conv2d of height 1).
    def _2d(self, spec) -> tuple[list[int], list[int], list[int], list[int]]:
        raise NotImplementedError

    def _padded(self, spec, a: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The input as 4-d, padded by the padding mode, and the padding
        left for the convolution itself (zeros)."""
        kernel, stride, padding, dilation = self._2d(spec)
        if self.n == 1:
            a = a.unsqueeze(2)
        mode = spec.get("padding_mode", "zeros")
        if mode == "zeros":
            return a, padding
        a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]), mode=mode)
        return a, [0, 0]

    def raw(self, spec, x, g):
        kernel, stride, _, dilation = self._2d(spec)
        a, padding = self._padded(spec, x.float())
        u = _unfold(a, kernel, stride, padding, dilation)
        return u, g.reshape(g.shape[0], spec["out_channels"], -1)

    def check_products(self, spec, u, g, rw, rb):
        groups = spec.get("groups", 1)
        if groups == 1:
            ur = torch.matmul(rw, u)  # (B, P); einsum("bkp,k->bp") is 5-8x slower on a CPU
            if rb is not None:
                ur = ur + rb
            return (torch.einsum("bcp,bp->c", g, ur),
                    torch.einsum("bcp,bp->c", g.abs(), ur.abs()))
        b, k, p = u.shape
        ur = torch.matmul(rw, u.reshape(b, groups, k // groups, p))  # (B, groups, P)
        if rb is not None:
            ur = ur + rb
        gg = g.reshape(b, groups, -1, p)
        return (torch.einsum("bgcp,bgp->gc", gg, ur).reshape(-1),
                torch.einsum("bgcp,bgp->gc", gg.abs(), ur.abs()).reshape(-1))

    def record(self, spec, bias, u, v):
        b = u.shape[0]
        if spec["storage"] == "factors":
            return u.reshape(b, -1), v.reshape(b, -1)
        groups = spec.get("groups", 1)
        if groups == 1:
            dw = torch.bmm(v, u.transpose(1, 2)).reshape(b, -1)
        else:
            k, p = u.shape[1], u.shape[2]
            dw = torch.einsum("bgcp,bgkp->bgck", v.reshape(b, groups, -1, p),
                              u.reshape(b, groups, k // groups, p)).reshape(b, -1)
        if bias:
            dw = torch.cat([dw, v.sum(dim=2)], dim=1)
        return torch.empty((b, 0), device=u.device), dw

    def probe(self, spec, x, dw, db):
        kernel, stride, _, dilation = self._2d(spec)
        a, padding = self._padded(spec, x.double())
        w = dw.reshape(dw.shape[0], dw.shape[1], *kernel)
        p = F.conv2d(a, w, db, stride=stride, padding=padding, dilation=dilation,
                     groups=spec.get("groups", 1))
        return x.double().reshape(x.shape[0], -1), p.reshape(x.shape[0], -1)


class Conv2d(_Conv):
    """``nn.Conv2d``: any groups (depthwise included) and padding mode
    (zeros, reflect, replicate, circular: pad, then unfold)."""

    name = "conv2d"
    module = nn.Conv2d
    n = 2

    def spec(self, layer, m, xs, mode):
        geo = self._geometry(m, xs[0])
        spec = {
            "kind": "conv2d",
            "name": layer,
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel": geo["kernel"],
            "stride": geo["stride"],
            "padding": geo["padding"],
            "dilation": geo["dilation"],
            "input_hw": geo["size"],
            "output_hw": geo["out"],
            "bias": m.bias is not None,
            "traced": True,
        }
        self._extras(spec, m)
        spec["storage"] = _storage(spec, mode)
        return spec

    def check_input(self, layer, x):
        if x.dim() != 4:
            return (f"layer {layer!r}: input of shape {tuple(x.shape)}; Conv2d layers are "
                    "traced for inputs of shape (batch, channels, height, width)")
        return None

    def _2d(self, spec):
        return spec["kernel"], spec["stride"], spec["padding"], spec["dilation"]


class Conv1d(_Conv):
    """``nn.Conv1d``: a Conv2d of height 1 (any groups and padding mode)."""

    name = "conv1d"
    module = nn.Conv1d
    n = 1

    def spec(self, layer, m, xs, mode):
        geo = self._geometry(m, xs[0])
        spec = {
            "kind": "conv1d",
            "name": layer,
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel": geo["kernel"][0],
            "stride": geo["stride"][0],
            "padding": geo["padding"][0],
            "dilation": geo["dilation"][0],
            "input_len": geo["size"][0],
            "output_len": geo["out"][0],
            "bias": m.bias is not None,
            "traced": True,
        }
        self._extras(spec, m)
        spec["storage"] = _storage(spec, mode)
        return spec

    def check_input(self, layer, x):
        if x.dim() != 3:
            return (f"layer {layer!r}: input of shape {tuple(x.shape)}; Conv1d layers are "
                    "traced for inputs of shape (batch, channels, length)")
        return None

    def _2d(self, spec):
        return ([1, spec["kernel"]], [1, spec["stride"]], [0, spec["padding"]],
                [1, spec["dilation"]])


# Every traced kind; a module is matched by the first whose class it is.
KINDS: tuple[Kind, ...] = (Linear(), Conv2d(), Conv1d(), Embedding(), LayerNorm(), RMSNorm())
BY_NAME = {k.name: k for k in KINDS}
MODULE_NAMES = ", ".join(f"nn.{k.module.__name__}" for k in KINDS)
SHORT_NAMES = ", ".join(k.module.__name__ for k in KINDS)


def of(m: nn.Module) -> Kind | None:
    """The kind that traces module ``m``, or None."""
    return next((k for k in KINDS if k.traces(m)), None)
