"""Triton kernels for InfoNCE over per-query negatives (``info_nce(..., negatives=(N, M, D))``).

Contract: ``contrastgen/reference/infonce_paired.py`` (``paired_lse_fwd_ref`` / ``paired_lse_bwd_ref``); the
in-batch part of the loss comes from the InfoNCE core and the two log-sum-exps are merged in
``contrastgen/ops/infonce_paired.py``.

Math (row i, its own negatives n_i1 .. n_iM, scale = 1 / temperature):
    forward   x_ij = scale q_i . n_ij,  lse_i = log sum_j exp(x_ij)          (x saved as (N, M) fp32 if SAVE_LOGITS)
    backward  dS_ij = g_i exp(x_ij - lse_i)   (lse_i of the whole row, in-batch columns included)
              dq_i = scale sum_j dS_ij n_ij,  dn_ij = scale dS_ij q_i,  dscale = sum_ij dS_ij x_ij / scale

Why not tensor cores: the logits are a batched matrix-vector product, each negative meets exactly one query,
so there is no operand reuse and no ``tl.dot`` (a (1, D) x (D, M) product per row would waste 15/16 of an MMA);
the products are elementwise multiplies and row sums in fp32 registers, and the kernels are bound by the
bandwidth of streaming n.  (Elementwise fp32 arithmetic also keeps the interpreter's bf16 ``tl.dot`` bug,
triton issue 11584, out of the way: no UPCAST flag is needed.)

Work and traffic per (BLOCK_M, BLOCK_D) tile (E = element size of n):
    forward   2 BLOCK_M BLOCK_D FLOPs; reads BLOCK_M BLOCK_D E bytes of n (q: BLOCK_D E, cached);
              per BLOCK_M tile writes 4 BLOCK_M bytes of logits (SAVE_LOGITS)
    backward  2 BLOCK_M BLOCK_D FLOPs for dq (NEED_DQ) + BLOCK_M BLOCK_D for dn (NEED_DN); reads BLOCK_M BLOCK_D E
              bytes of n (NEED_DQ), writes BLOCK_M BLOCK_D E bytes of dn (NEED_DN); the logits tile (4 BLOCK_M bytes)
              is re-read once per D chunk (4 / (BLOCK_D E) of the n traffic, <= 3%)
    whole op: forward reads N M D E bytes, backward reads N M D E and writes N M D E: the minimum traffic, arithmetic
    intensity ~0.5 FLOP/byte (bf16) -- far below any GPU's ridge point, so the target is HBM bandwidth.
Grid (N, S): program (i, s) owns the columns [s CHUNK, (s + 1) CHUNK) of row i, S chosen so that N S covers the
SMs a few times even for a handful of queries with many negatives (DCR: N = B <= 64).  The forward stores one
(max, sum exp) partial per program, merged per row by torch (O(N S)); the backward stores one dq partial (D floats)
and one dscale partial per program, summed by torch: no atomics, deterministic.
Non-finite inputs propagate: a NaN or +inf logit gives that row a NaN lse, hence NaN dS, dq_i and dn_i*.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import AotConfig

NEG = tl.constexpr(-1.0e30)  # the contract's finite "-inf": padding lanes of a tile


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _paired_fwd_kernel(q_ptr, n_ptr, scale_ptr, logits_ptr, part_ptr, M, D, CHUNK,
                       SAVE_LOGITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial (max, sum exp) of x_ij = scale q_i . n_ij over the CHUNK columns of program (i, s)."""
    i = tl.program_id(0)
    s = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    q_row = q_ptr + i.to(tl.int64) * D
    n_row = n_ptr + i.to(tl.int64) * M * D
    j_start = s * CHUNK
    j_end = tl.minimum(M, j_start + CHUNK)
    m_run = tl.full((), NEG, tl.float32)
    l_run = tl.zeros((), tl.float32)
    for j0 in range(j_start, j_end, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        cmask = cols < j_end
        acc = tl.zeros((BLOCK_M,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dmask = offs < D
            qv = tl.load(q_row + offs, mask=dmask, other=0.0).to(tl.float32)                       # (BLOCK_D,)
            nt = tl.load(n_row + cols[:, None] * D + offs[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)                                                  # (BLOCK_M, BLOCK_D)
            acc += tl.sum(nt * qv[None, :], 1)                                                      # (BLOCK_M,)
        x = scale * acc
        if SAVE_LOGITS:
            tl.store(logits_ptr + i.to(tl.int64) * M + cols, x, mask=cmask)
        m_new = tl.maximum(m_run, tl.max(tl.where(cmask, x, NEG), 0))
        l_run = l_run * tl.exp(m_run - m_new) + tl.sum(tl.where(cmask, tl.exp(x - m_new), 0.0), 0)
        m_run = m_new
    part = part_ptr + (i * tl.num_programs(1) + s) * 2
    tl.store(part, m_run)
    tl.store(part + 1, l_run)


@triton.jit
def _paired_bwd_kernel(q_ptr, n_ptr, scale_ptr, logits_ptr, lse_ptr, g_ptr, dq_part_ptr, dn_ptr, dscale_part_ptr,
                       M, D, CHUNK, NEED_DQ: tl.constexpr, NEED_DN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dS_ij = g_i exp(x_ij - lse_i) over the CHUNK columns of program (i, s): its dq partial
    scale sum_j dS_ij n_ij (NEED_DQ), dn_ij = scale dS_ij q_i (NEED_DN), and sum_j dS_ij x_ij / scale."""
    i = tl.program_id(0)
    s = tl.program_id(1)
    prog = i * tl.num_programs(1) + s
    scale = tl.load(scale_ptr).to(tl.float32)
    g_i = tl.load(g_ptr + i).to(tl.float32)
    lse_i = tl.load(lse_ptr + i).to(tl.float32)
    q_row = q_ptr + i.to(tl.int64) * D
    n_row = n_ptr + i.to(tl.int64) * M * D
    dn_row = dn_ptr + i.to(tl.int64) * M * D
    x_row = logits_ptr + i.to(tl.int64) * M
    j_start = s * CHUNK
    j_end = tl.minimum(M, j_start + CHUNK)
    acc_s = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(j_start, j_end, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        cmask = cols < j_end
        x = tl.load(x_row + cols, mask=cmask, other=0.0)
        acc_s += tl.where(cmask, g_i * tl.exp(x - lse_i) * x, 0.0)
    tl.store(dscale_part_ptr + prog, tl.sum(acc_s, 0) / scale)
    if NEED_DQ or NEED_DN:
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dmask = offs < D
            qv = tl.load(q_row + offs, mask=dmask, other=0.0).to(tl.float32)                       # (BLOCK_D,)
            acc_dq = tl.zeros((BLOCK_D,), tl.float32)
            for j0 in range(j_start, j_end, BLOCK_M):
                cols = j0 + tl.arange(0, BLOCK_M)
                cmask = cols < j_end
                x = tl.load(x_row + cols, mask=cmask, other=0.0)
                ds = tl.where(cmask, g_i * tl.exp(x - lse_i), 0.0)                                  # (BLOCK_M,)
                tmask = cmask[:, None] & dmask[None, :]
                toffs = cols[:, None] * D + offs[None, :]
                if NEED_DQ:
                    nt = tl.load(n_row + toffs, mask=tmask, other=0.0).to(tl.float32)               # (BLOCK_M, BLOCK_D)
                    acc_dq += tl.sum(ds[:, None] * nt, 0)                                           # (BLOCK_D,)
                if NEED_DN:
                    dn = (scale * ds)[:, None] * qv[None, :]                                        # (BLOCK_M, BLOCK_D)
                    tl.store(dn_row + toffs, dn.to(dn_ptr.dtype.element_ty), mask=tmask)
            if NEED_DQ:
                tl.store(dq_part_ptr + prog.to(tl.int64) * D + offs, scale * acc_dq, mask=dmask)


# ----------------------------------------------------------------------------------------------- configs
# arch -> precision -> (BLOCK_M, BLOCK_D, num_warps, num_stages).  Bandwidth-bound streaming of n: each program
# keeps a few 8-16 KiB tiles in flight.  sm_90 (H100/H200, ~3.3-4.8 TB/s) gets twice the rows per tile and more
# warps than sm_80 to keep more bytes in flight per SM; the tiles stay <= 32 fp32 registers per thread per tile.
CONFIGS = {
    80: {"fp32": (32, 128, 4, 2), "16bit": (32, 128, 4, 2)},
    90: {"fp32": (64, 128, 8, 3), "16bit": (64, 128, 8, 3)},
}
INTERPRET_CONFIG = (64, 128, 4, 1)   # few, large tiles keep the interpreter fast
PROGRAMS_PER_SM = 4
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "16bit", torch.float16: "16bit"}


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _config(t: torch.Tensor):
    """(BLOCK_M, BLOCK_D, num_warps, num_stages) for the negatives ``t`` (N, M, D).  On GPU always the arch's
    shipped tile (the AOT list holds exactly these); the interpreter narrows BLOCK_D to D for speed."""
    if _interpreting() or t.device.type != "cuda":
        bm, bd, w, st = INTERPRET_CONFIG
        return bm, min(bd, max(16, triton.next_power_of_2(t.shape[-1]))), w, st
    return CONFIGS[_arch(t.device)][PRECISIONS[t.dtype]]


def _split(n: int, m: int, block_m: int, device: torch.device):
    """(S, CHUNK): programs per row and columns per program (a multiple of BLOCK_M)."""
    if device.type == "cuda" and not _interpreting():
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    s = max(1, min(triton.cdiv(m, block_m), triton.cdiv(target, n)))
    chunk = triton.cdiv(triton.cdiv(m, s), block_m) * block_m
    return triton.cdiv(m, chunk), chunk


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Contiguous kernel input; float64 (direct op calls, gradcheck) is computed in float32."""
    if t.dtype == torch.float64:
        t = t.float()
    if t.dtype not in PRECISIONS:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {t.dtype}")
    return t.contiguous()


def _check_offsets(m: int, d: int):
    if m * d >= 2 ** 31:
        raise ValueError(f"the per-query negatives kernel uses 32-bit offsets within a row: M x D must stay below "
                         f"2**31, got {m} x {d}")


# ----------------------------------------------------------------------------------------------- launchers
def paired_fwd(q, negs, scale, save_logits: bool):
    """-> (lse (N,) float32, logits (N, M) float32 or (0, M))."""
    q, negs = _kernel_input(q), _kernel_input(negs)
    n, m, d = negs.shape
    _check_offsets(m, d)
    bm, bd, w, st = _config(negs)
    s, chunk = _split(n, m, bm, negs.device)
    dev = negs.device
    sc = scale.detach().reshape(1).to(device=dev, dtype=torch.float32)
    part = torch.empty(n, s, 2, dtype=torch.float32, device=dev)
    logits = torch.empty(n if save_logits else 0, m, dtype=torch.float32, device=dev)
    _paired_fwd_kernel[(n, s)](q, negs, sc, logits if save_logits else part, part, m, d, chunk,
                               SAVE_LOGITS=bool(save_logits), BLOCK_M=bm, BLOCK_D=bd,
                               num_warps=w, num_stages=st)
    pm, pl = part[..., 0], part[..., 1]
    mx = pm.amax(1)
    tot = (pl * torch.exp(pm - mx[:, None])).sum(1)
    lse = torch.where(tot == 0, torch.full_like(mx, -1e30), mx + torch.log(tot))
    return lse, logits


def paired_bwd(q, negs, scale, logits, lse, g, need_dq: bool, need_dnegs: bool):
    """-> (dq like q or None, dnegs like negs or None, dscale 0-d float32)."""
    dtypes = (q.dtype, negs.dtype)
    q, negs = _kernel_input(q), _kernel_input(negs)
    n, m, d = negs.shape
    _check_offsets(m, d)
    bm, bd, w, st = _config(negs)
    s, chunk = _split(n, m, bm, negs.device)
    dev = negs.device
    sc = scale.detach().reshape(1).to(device=dev, dtype=torch.float32)
    dq_part = torch.empty(n, s, d if need_dq else 1, dtype=torch.float32, device=dev)
    dn = torch.empty_like(negs) if need_dnegs else q
    dscale_part = torch.empty(n, s, dtype=torch.float32, device=dev)
    _paired_bwd_kernel[(n, s)](q, negs, sc, logits.to(torch.float32).contiguous(), lse.to(torch.float32).contiguous(),
                               g.to(torch.float32).contiguous(), dq_part, dn, dscale_part, m, d, chunk,
                               NEED_DQ=bool(need_dq), NEED_DN=bool(need_dnegs), BLOCK_M=bm, BLOCK_D=bd,
                               num_warps=w, num_stages=st)
    dq = dq_part.sum(1).to(dtypes[0]) if need_dq else None
    dnegs = dn.to(dtypes[1]) if need_dnegs else None
    return dq, dnegs, dscale_part.sum()


# ----------------------------------------------------------------------------------------------- AOT list
_MOD = __name__


def _aot_configs():
    """Every (kernel, dtype, constexpr flags, tile) the launchers build on GPU, with the archs it runs on."""
    out = []
    for dt in ("fp32", "bf16", "fp16"):
        prec = "fp32" if dt == "fp32" else "16bit"
        for arch, table in CONFIGS.items():
            bm, bd, w, st = table[prec]
            for save in (True, False):
                sig = {"q_ptr": f"*{dt}", "n_ptr": f"*{dt}", "scale_ptr": "*fp32", "logits_ptr": "*fp32",
                       "part_ptr": "*fp32", "M": "i32", "D": "i32", "CHUNK": "i32", "SAVE_LOGITS": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
                out.append(AotConfig(f"{_MOD}:_paired_fwd_kernel", sig,
                                     {"SAVE_LOGITS": save, "BLOCK_M": bm, "BLOCK_D": bd}, w, st,
                                     divisible_by_16=("D", "CHUNK"), archs=(arch,)))
            for need_dq, need_dn in ((True, True), (True, False), (False, True), (False, False)):
                sig = {"q_ptr": f"*{dt}", "n_ptr": f"*{dt}", "scale_ptr": "*fp32", "logits_ptr": "*fp32",
                       "lse_ptr": "*fp32", "g_ptr": "*fp32", "dq_part_ptr": "*fp32",
                       "dn_ptr": f"*{dt}", "dscale_part_ptr": "*fp32", "M": "i32", "D": "i32", "CHUNK": "i32",
                       "NEED_DQ": "constexpr", "NEED_DN": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
                out.append(AotConfig(f"{_MOD}:_paired_bwd_kernel", sig,
                                     {"NEED_DQ": need_dq, "NEED_DN": need_dn, "BLOCK_M": bm, "BLOCK_D": bd}, w, st,
                                     divisible_by_16=("D", "CHUNK"), archs=(arch,)))
    return out


AOT_CONFIGS = _aot_configs()
