"""CUDA tests of the compiled InfoNCE / CLIP / SigLIP Triton kernels (the shipped GPU tiles), at headline-ish sizes,
against a float64 reference evaluated in row chunks (never more than ~1 GiB at a time).

Skipped without CUDA; run with TRITON_INTERPRET unset or 0 (benches/gpu.sh exports TRITON_INTERPRET=0; tests/
conftest.py sets it to 1 only where it is unset, and the kernels interpret only for "1").  About 20 kernel
specializations are compiled on first use (Triton's cache makes a second run faster); the whole file is meant to
stay under ~2 minutes on an H200.  The dispersive kernels have their own file (tests/test_cuda_dispersive.py).

Rule (tests/_tolerance.py): |kernel - float64| <= 2 |PyTorch in the same dtype - float64| + floor x magnitude, with
PyTorch's dense reference (``backend="torch"``) run in the input dtype on the GPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_2x_torch, magnitude as _mag, max_err as _err

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the CUDA tests run the compiled kernels (set TRITON_INTERPRET=0)",
                allow_module_level=True)

import contrastgen  # noqa: E402
from contrastgen import reference as ref  # noqa: E402

K = pytest.importorskip("contrastgen.kernels.infonce")

DEV = "cuda"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FLOOR = {F32: 2e-5, BF16: 2e-2, F16: 4e-3}
CHUNK = 2048


# ----------------------------------------------------------------------------------------------- float64, chunked
class _Core64(torch.autograd.Function):
    """The supcon InfoNCE core of contrastgen/reference/core.py in float64, by row chunks: (row_loss, col_loss).
    Forward: the row lse per chunk, the column lse as a running (max, sum) over the chunks; backward: dS per chunk,
    dq = scale dS keys, dkeys += scale dS^T q_chunk."""

    @staticmethod
    def tile(q, keys, m, scale, ql, kl, ex, ibn, r0):
        qc = q[r0:r0 + CHUNK]
        c, kb = qc.shape[0], keys.shape[0] - m
        rows = torch.arange(r0, r0 + c, device=q.device)
        s = scale * (qc @ keys.T)
        same = rows[:, None] == torch.arange(m, device=q.device)[None, :]
        pos = (ql[rows][:, None] == kl[None, :]) if ql is not None else same.clone()
        valid = torch.ones_like(pos)
        if ex:
            valid &= ~same
            pos &= valid
        if not ibn:
            valid = pos.clone()
        pos = torch.cat([pos, pos.new_zeros(c, kb)], 1)
        valid = torch.cat([valid, valid.new_ones(c, kb)], 1)
        return s, pos, valid

    @staticmethod
    def forward(ctx, q, k, bank, scale, ql, kl, ex, ibn, sym):
        n, m = q.shape[0], k.shape[0]
        keys = torch.cat([k, bank]) if bank is not None else k
        row_lse, row_loss = q.new_empty(n), q.new_empty(n)
        col_m = q.new_full((m,), float("-inf"))
        col_l, col_ps, col_np = q.new_zeros(m), q.new_zeros(m), q.new_zeros(m)
        for r0 in range(0, n, CHUNK):
            s, pos, valid = _Core64.tile(q, keys, m, scale, ql, kl, ex, ibn, r0)
            sl = slice(r0, r0 + s.shape[0])
            npos = pos.sum(1).double()
            lse = torch.logsumexp(s.masked_fill(~valid, float("-inf")), 1)
            row_lse[sl] = lse
            row_loss[sl] = torch.where(npos > 0, lse - torch.where(pos, s, 0.0).sum(1) / npos.clamp_min(1), 0.0)
            if sym:
                sb, vb, pb = s[:, :m], valid[:, :m], pos[:, :m]
                cm = torch.maximum(col_m, sb.masked_fill(~vb, float("-inf")).amax(0))
                col_l = col_l * torch.exp(col_m - cm).nan_to_num(0.0) + torch.where(vb, torch.exp(sb - cm), 0.0).sum(0)
                col_m = cm
                col_ps += torch.where(pb, sb, 0.0).sum(0)
                col_np += pb.sum(0)
        col_lse = col_m + torch.log(col_l)
        col_loss = torch.where(col_np > 0, col_lse - col_ps / col_np.clamp_min(1), 0.0) if sym else q.new_zeros(0)
        ctx.save_for_backward(q, k, bank, scale, ql, kl, row_lse, col_lse, col_np)
        ctx.flags = (ex, ibn, sym)
        return row_loss, col_loss

    @staticmethod
    def backward(ctx, g_row, g_col):
        q, k, bank, scale, ql, kl, row_lse, col_lse, col_np = ctx.saved_tensors
        ex, ibn, sym = ctx.flags
        m = k.shape[0]
        keys = torch.cat([k, bank]) if bank is not None else k
        dq, dkeys, dscale = torch.zeros_like(q), torch.zeros_like(keys), q.new_zeros(())
        for r0 in range(0, q.shape[0], CHUNK):
            s, pos, valid = _Core64.tile(q, keys, m, scale, ql, kl, ex, ibn, r0)
            sl = slice(r0, r0 + s.shape[0])
            npos = pos.sum(1, keepdim=True).double()
            ds = torch.where(npos > 0, g_row[sl, None] * (torch.where(valid, torch.exp(s - row_lse[sl, None]), 0.0)
                                                          - pos.double() / npos.clamp_min(1)), 0.0)
            if sym:
                pc = torch.where(valid[:, :m], torch.exp(s[:, :m] - col_lse[None, :]), 0.0)
                dsc = g_col[None, :] * (pc - pos[:, :m].double() / col_np.clamp_min(1)[None, :])
                ds[:, :m] += torch.where((col_np > 0)[None, :], dsc, 0.0)
            dq[sl] = scale * ds @ keys
            dkeys += scale * ds.T @ q[sl]
            dscale += (ds * s).sum() / scale
        dk, dbank = dkeys[:m], (dkeys[m:] if bank is not None else None)
        return dq, dk, dbank, dscale, None, None, None, None, None


def core64(*args):
    return _Core64.apply(*args)


def clip64(image, text, scale):
    row, col = core64(image, text, None, scale, None, None, False, True, True)
    return 0.5 * (row.mean() + col.mean())


def moco64(q, k, bank, temperature):
    row, _ = core64(q, k, bank, 1.0 / temperature, None, None, False, False, False)
    return row.mean()


def nt_xent64(z1, z2, temperature):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    labels = torch.arange(z1.shape[0], device=z.device).repeat(2)
    scale = torch.tensor(1.0 / temperature, dtype=z.dtype, device=z.device)
    row, _ = core64(z, z, None, scale, labels, labels, True, True, False)
    return row.mean()


class _Siglip64(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, bias):
        ctx.save_for_backward(q, k, scale, bias)
        total = q.new_zeros(())
        for r0 in range(0, q.shape[0], CHUNK):
            z = scale * (q[r0:r0 + CHUNK] @ k.T) + bias
            y = -torch.ones_like(z)
            idx = torch.arange(z.shape[0], device=q.device)
            y[idx, idx + r0] = 1.0
            total += -F.logsigmoid(y * z).sum()
        return total / q.shape[0]

    @staticmethod
    def backward(ctx, g):
        q, k, scale, bias = ctx.saved_tensors
        dq, dk, ds, db = torch.zeros_like(q), torch.zeros_like(k), q.new_zeros(()), q.new_zeros(())
        for r0 in range(0, q.shape[0], CHUNK):
            qk = q[r0:r0 + CHUNK] @ k.T
            z = scale * qk + bias
            y = -torch.ones_like(z)
            idx = torch.arange(z.shape[0], device=q.device)
            y[idx, idx + r0] = 1.0
            dz = -(g / q.shape[0]) * y * torch.sigmoid(-y * z)
            dq[r0:r0 + CHUNK] = scale * dz @ k
            dk += scale * dz.T @ q[r0:r0 + CHUNK]
            ds += (dz * qk).sum()
            db += dz.sum()
        return dq, dk, ds, db


# ----------------------------------------------------------------------------------------------- the check
def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _check(fused, dense, exact64, leaves, dtype, floor=None):
    """fused(*leaves in dtype) vs exact64(*leaves in float64), with dense(*leaves in dtype) as PyTorch's error."""
    floor = FLOOR[dtype] if floor is None else floor
    lows = [_leaf(t, dtype) for t in leaves]
    torch_lows = [_leaf(t, dtype) for t in leaves]
    his = [t.detach().double().requires_grad_(t.requires_grad) for t in lows]
    out = fused(*lows)
    got = torch.autograd.grad(out, [t for t in lows if t.requires_grad])
    d = dense(*torch_lows)
    dg = torch.autograd.grad(d, [t for t in torch_lows if t.requires_grad])
    e = exact64(*his)
    eg = torch.autograd.grad(e, [t for t in his if t.requires_grad])
    assert torch.isfinite(out) and out.dtype == dtype
    assert_2x_torch("loss", out, e, d, floor)
    for i, (a, b, c) in enumerate(zip(got, eg, dg)):
        assert torch.isfinite(a).all(), f"grad[{i}]"
        assert_2x_torch(f"grad[{i}]", a, b, c, floor)
    return out, got


def _unit(n, d, seed, dtype=F32):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return F.normalize(torch.randn(n, d, device=DEV, generator=g), dim=1).to(dtype)


# ----------------------------------------------------------------------------------------------- tests
def test_clip_headline_bf16_records_chunks_and_determinism(monkeypatch):
    """CLIP N = 16,384, D = 512, bf16: the one-pass symmetric forward (row and column records), then the same with
    the workspace forced small (row chunks: the column records merged across chunks, the dS slab in chunks), and
    two backward passes in deterministic mode bitwise equal."""
    n, d = 16384, 512
    image, text = _unit(n, d, 1).requires_grad_(), _unit(n, d, 2).requires_grad_()
    s = torch.tensor(1 / 0.07, device=DEV)
    loss, grads = _check(lambda i, t: contrastgen.clip_loss(i, t, s, backend="triton"),
                         lambda i, t: contrastgen.clip_loss(i, t, s, backend="torch"),
                         lambda i, t: clip64(i, t, s.double()), [image, text], BF16)
    monkeypatch.setattr(K, "FORCE_WORKSPACE_BYTES", 32 * 2 ** 20)   # 3 forward chunks, 16 backward slabs
    monkeypatch.setenv("CONTRASTGEN_DETERMINISTIC", "1")
    i2, t2 = _leaf(image, BF16), _leaf(text, BF16)
    chunked = contrastgen.clip_loss(i2, t2, s, backend="triton")
    g1 = torch.autograd.grad(chunked, [i2, t2], retain_graph=True)
    g2 = torch.autograd.grad(chunked, [i2, t2])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))                       # bitwise reproducible
    assert abs(chunked.float() - loss.float()) <= 1e-2 * abs(loss.float())      # same loss (bf16 output)
    for a, b in zip(g1, grads):
        assert _err(a, b) <= 2e-2 * _mag(b)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_clip_fp16_fp32(dtype):
    n, d = 4096, 256
    image, text = _unit(n, d, 3).requires_grad_(), _unit(n, d, 4).requires_grad_()
    s = torch.tensor(30.0, device=DEV, requires_grad=True)
    _check(lambda i, t, s_: contrastgen.clip_loss(i, t, s_, backend="triton"),
           lambda i, t, s_: contrastgen.clip_loss(i, t, s_, backend="torch"),
           lambda i, t, s_: clip64(i, t, s_), [image, text, s], dtype)


def test_moco_bank_without_grad_bf16():
    """MoCo: a bank of 32,768 negatives that needs no gradient (no dbank product), no in-batch negatives."""
    n, kb, d = 4096, 32768, 256
    q, k = _unit(n, d, 5).requires_grad_(), _unit(n, d, 6).requires_grad_()
    bank = _unit(kb, d, 7, BF16)   # the kernel's and the float64 reference's bank are the same numbers
    t = torch.tensor(0.07, device=DEV, requires_grad=True)
    _check(lambda q_, k_, t_: contrastgen.info_nce(q_, k_, negatives=bank.to(q_.dtype), temperature=t_,
                                                   backend="triton"),
           lambda q_, k_, t_: contrastgen.info_nce(q_, k_, negatives=bank.to(q_.dtype), temperature=t_,
                                                   backend="torch"),
           lambda q_, k_, t_: moco64(q_, k_, bank.double(), t_), [q, k, t], BF16)


def test_nt_xent_labels_bf16():
    """Labels + self exclusion (nt_xent: 2N views, positive = the other view)."""
    n, d = 4096, 256
    g = torch.Generator(device=DEV).manual_seed(8)
    z1 = torch.randn(n, d, device=DEV, generator=g).requires_grad_()
    z2 = (z1.detach() + 0.3 * torch.randn(n, d, device=DEV, generator=g)).requires_grad_()
    _check(lambda a, b: contrastgen.nt_xent(a, b, temperature=0.2, backend="triton"),
           lambda a, b: contrastgen.nt_xent(a, b, temperature=0.2, backend="torch"),
           lambda a, b: nt_xent64(a, b, 0.2), [z1, z2], BF16)


def test_siglip_bf16():
    n, d = 8192, 512
    image, text = _unit(n, d, 9).requires_grad_(), _unit(n, d, 10).requires_grad_()
    s = torch.tensor(10.0, device=DEV, requires_grad=True)
    b = torch.tensor(-10.0, device=DEV, requires_grad=True)
    _check(lambda i, t, s_, b_: contrastgen.siglip_loss(i, t, s_, b_, backend="triton"),
           lambda i, t, s_, b_: contrastgen.siglip_loss(i, t, s_, b_, backend="torch"),
           lambda i, t, s_, b_: _Siglip64.apply(i, t, s_, b_), [image, text, s, b], BF16)


def test_odd_feature_dim_pointer_tiles_bf16():
    """D = 100 (rows not 16-byte aligned): the pointer (non-TMA) tiles."""
    n, d = 3000, 100
    image, text = _unit(n, d, 11).requires_grad_(), _unit(n, d, 12).requires_grad_()
    s = torch.tensor(20.0, device=DEV)
    _check(lambda i, t: contrastgen.clip_loss(i, t, s, backend="triton"),
           lambda i, t: contrastgen.clip_loss(i, t, s, backend="torch"),
           lambda i, t: clip64(i, t, s.double()), [image, text], BF16)


def test_nonfinite_inputs_compiled():
    """The compiled max / where semantics (NaN-dropping maxima) still give a non-finite loss and gradient."""
    q, k, bank = torch.randn(300, 64, device=DEV), torch.randn(300, 64, device=DEV), torch.randn(500, 64, device=DEV)
    bank[3, 0] = float("nan")
    q.requires_grad_()
    loss = contrastgen.info_nce(q, k, negatives=bank, backend="triton")
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, [q])
    assert not torch.isfinite(g).any()
    i, t = torch.randn(300, 64, device=DEV), torch.randn(300, 64, device=DEV)
    i[7, 3] = float("nan")
    i.requires_grad_()
    loss = contrastgen.clip_loss(i, t, torch.tensor(10.0, device=DEV), backend="triton")
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, [i])
    assert not torch.isfinite(g).any()
