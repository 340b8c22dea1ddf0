"""Inference fast paths: when intermediate tensors may be overwritten, and the transformer's
matrix products, with a float32 CPU path through oneDNN and the plain torch formulation as
fallback.

Dimensions: I input features, O output features; B batch, H heads, N queries, M keys, D head
width.

torch's float32 ``F.linear`` and its fused CPU attention multiply with the BLAS library torch was
built with (MKL), which on some CPUs (AMD Zen, notably) runs at half the speed of oneDNN, the
library behind torch's CPU convolutions. oneDNN also fuses the activation or the residual add
into the product, saving a pass over the output. We reach it through torch's internal
``mkldnn::_linear_pointwise`` ops (those its graph compiler uses for fused linear layers). They
have no autograd formula, so they are used only when no gradient is being recorded, on float32
CPU tensors outside autocast, and only if a probe call works on this build. Results agree with
the fallback to float32 rounding (about 1e-6 relative).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has working oneDNN linear ops (probed once)."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return False
        x, weight = torch.ones(2, 3), torch.ones(4, 3)
        plain = ops._linear_pointwise(x, weight, None, "none", [], "")
        added = ops._linear_pointwise.binary(x, plain, weight, None, "add")
        return bool(torch.equal(added, 2 * plain))
    except (AttributeError, RuntimeError):
        return False


# Our activation names -> oneDNN post-op and algorithm ("none": erf GELU, not the tanh one).
_ONEDNN_ACTIVATIONS = {None: ("none", ""), "gelu": ("gelu", "none"), "relu": ("relu", "")}


def overwritable(x: torch.Tensor) -> bool:
    """Whether intermediate tensors like ``x`` may be overwritten in place: no gradient is being
    recorded, and no autocast is on (whose dtype promotions the in-place forms would change)."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def fast_path(x: torch.Tensor) -> bool:
    """True when ``x`` may take the oneDNN inference path."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and overwritable(x)
        and not torch.compiler.is_compiling()  # inductor lowers these ops for frozen weights only
        and onednn_linear_available()
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = None,
) -> torch.Tensor:
    """``F.linear``, then the exact (erf) ``"gelu"`` or ``"relu"`` if asked.

    x: (..., I), weight: (O, I) -> (..., O)
    """
    if fast_path(x):
        attr, algorithm = _ONEDNN_ACTIVATIONS[activation]
        # A strided weight sends oneDNN to a reference kernel, hundreds of times slower.
        weight = weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return F.gelu(y) if activation == "gelu" else F.relu(y)


def linear_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)``, a new tensor.

    x: (..., I), residual: (..., O), weight: (O, I) -> (..., O)
    """
    shape = (*x.shape[:-1], weight.shape[0])
    dense = residual.shape == shape and residual.dtype == x.dtype and residual.is_contiguous()
    if dense and fast_path(x):
        weight = weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return residual + F.linear(x, weight, bias)


# Queries per block in ``attention``: a block's scores (rows x keys floats) stay in cache.
_ATTENTION_BLOCK = 512


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T) v for every head, with the 1/sqrt(D) scale already applied to q; dropout
    on the attention weights (training only).

    q: (B, H, N, D), k, v: (B, H, M, D) -> (B, N, H, D).

    The fast path runs both products per head and per block of queries through oneDNN (about
    1.5x torch's fused CPU kernel, which multiplies with MKL); the softmax is torch's.
    """
    if dropout or not fast_path(q):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=1.0)
        return out.transpose(1, 2)
    batch, heads, queries, dim = q.shape
    out = q.new_empty(batch, queries, heads, dim)
    product = torch.ops.mkldnn._linear_pointwise
    # Dense operands (oneDNN falls back to a reference kernel for strided weights), the values
    # transposed to (D, M) to serve as the weight of the second product.
    q, k, v = q.contiguous(), k.contiguous(), v.transpose(2, 3).contiguous()
    for b in range(batch):
        for h in range(heads):
            for start in range(0, queries, _ATTENTION_BLOCK):
                end = start + _ATTENTION_BLOCK
                scores = product(q[b, h, start:end], k[b, h], None, "none", [], "")
                probs = torch.softmax(scores, dim=-1)
                out[b, start:end, h] = product(probs, v[b, h], None, "none", [], "")
    return out
