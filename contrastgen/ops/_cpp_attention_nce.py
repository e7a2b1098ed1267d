"""CPU (C++/OpenMP) launchers of the CONFORM attention-map loss (``csrc/attention_nce.cpp``).

Same functions and signatures as the Triton launchers in ``contrastgen.kernels.attention_nce``
(``attention_nce_fwd``, ``attention_nce_bwd``); ``contrastgen/ops/attention_nce.py`` wraps them in custom ops.
float32 and float64 maps are computed as they are (double precision inside); float16 / bfloat16 maps are
converted to float32 first (the maps are small: 16 x 16 x 77 per prompt).  Outputs are in the accumulation
dtype (float64 for float64 maps, else float32).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._backends import cpp_extension

_ext = cpp_extension("attention_nce")


def _need_ext():
    if _ext is None:
        raise RuntimeError("contrastgen._cpp_attention_nce is not built (CONTRASTGEN_SKIP_CPP=1 or no compiler at "
                           "install time)")
    return _ext


def _acc(t: Tensor) -> Tensor:
    return t.detach().contiguous() if t.dtype in (torch.float32, torch.float64) else t.detach().float().contiguous()


def _suffix(dtype: torch.dtype) -> str:
    return "f64" if dtype == torch.float64 else "f32"


def _common(maps, prev, tokens, labels, kinds, weights):
    m = _acc(maps)
    p = _acc(prev) if prev is not None else m.new_empty(0)
    w = np.asarray(weights, dtype=np.float64)
    ints = [t.detach().to(torch.int32).contiguous().numpy() for t in (tokens, labels, kinds)]
    return m, p, ints, w


def attention_nce_fwd(maps: Tensor, prev: Optional[Tensor], tokens: Tensor, labels: Tensor, kinds: Tensor,
                      weights, temperature: float, softmax_normalize: bool, smooth: bool, spatial_softmax: bool,
                      loss_mode: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """maps (B, H, W, T) -> (loss (B,), X (B, H*W, N), Gram (B, N, N), spatial-softmax stats (B, 2, N),
    Y (B, H*W, T) the token softmax of the maps, or (B, 0, T) without it), N = KP (x 2 with prev).
    ``weights``: the 1-D smoothing weights (sum 1, separable kernel)."""
    B, H, W, T = maps.shape
    KP = tokens.shape[1]
    N = KP * (2 if prev is not None else 1)
    m, p, (tok, lab, knd), w = _common(maps, prev, tokens, labels, kinds, weights)
    loss = torch.empty(B, dtype=m.dtype)
    xbuf = torch.empty(B, H * W, N, dtype=m.dtype)
    gram = torch.empty(B, N, N, dtype=m.dtype)
    stats = torch.empty(B, 2, N, dtype=m.dtype)
    ybuf = torch.empty(B, H * W if softmax_normalize else 0, T, dtype=m.dtype)
    getattr(_need_ext(), "attention_nce_fwd_" + _suffix(m.dtype))(
        m.numpy(), p.numpy(), tok, lab, knd, w, B, H, W, T, KP, prev is not None, bool(softmax_normalize),
        bool(smooth), bool(spatial_softmax), int(loss_mode), float(temperature),
        loss.numpy(), xbuf.numpy(), gram.numpy(), stats.numpy(), ybuf.numpy())
    return loss, xbuf, gram, stats, ybuf


def attention_nce_bwd(grad: Tensor, maps: Tensor, prev: Optional[Tensor], tokens: Tensor, labels: Tensor,
                      kinds: Tensor, weights, loss: Tensor, xbuf: Tensor, gram: Tensor, stats: Tensor,
                      ybuf: Tensor, temperature: float, softmax_normalize: bool, smooth: bool, spatial_softmax: bool,
                      loss_mode: int) -> Tensor:
    """d loss / d maps (B, H, W, T) in the accumulation dtype for the upstream gradient ``grad`` (B,)."""
    B, H, W, T = maps.shape
    KP = tokens.shape[1]
    m, p, (tok, lab, knd), w = _common(maps, prev, tokens, labels, kinds, weights)
    acc = m.dtype
    dmaps = torch.empty(B, H, W, T, dtype=acc)
    g, l, x, u, st, y = (t.detach().to(acc).contiguous() for t in (grad, loss, xbuf, gram, stats, ybuf))
    getattr(_need_ext(), "attention_nce_bwd_" + _suffix(acc))(
        g.numpy(), m.numpy(), p.numpy(), tok, lab, knd, w, l.numpy(), x.numpy(), u.numpy(), st.numpy(), y.numpy(),
        B, H, W, T, KP, prev is not None, bool(softmax_normalize), bool(smooth), bool(spatial_softmax),
        int(loss_mode), float(temperature), dmaps.numpy())
    return dmaps
