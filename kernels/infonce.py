"""Fused Triton kernels for the InfoNCE / CLIP / SigLIP / NT-Xent family.

The launchers ``infonce_fwd``, ``infonce_bwd``, ``siglip_fwd``, ``siglip_bwd`` implement the contract of
``contrastgen/reference/core.py`` (read it first).  The N x M logits are never stored: the forward keeps 20-byte
records per (row block, key), the backward one bounded slab of dS rows (see "Memory").

Math (s_ij = scale q_i.k_j; G = 2 N M D FLOP is one product of the logits)
----
* forward, supcon:  lse_i = log sum_{j valid} e^{s_ij},  loss_i = lse_i - mean_{p pos} s_ip;
  pml: lse_i over the valid negatives, loss_i = sum_{p pos} softplus(lse_i - s_ip);  symmetric: the same per column.
* backward: dS_ij = g_i (e^{s_ij - lse_i}[valid] - [pos]/npos_i) (+ g_j (e^{s_ij - lse_j}[valid] - [pos]/npos_j)),
  pml: dS = g_i (c_i e^{s_ij - lse_i}[valid negative] - sigmoid(lse_i - s_ij)[pos]), c_i = sum_p sigmoid(lse_i - s_ip);
  dq = scale dS [k; bank], dk = scale dS^T q, dbank = scale dS_bank^T q, dscale = sum dS_ij q_i.k_j.
* SigLIP: z = scale q.k + bias, loss_i = sum_j softplus(-y_ij z_ij); dZ = -g_i y sigmoid(-y z).

Kernels: one program = one block of BLOCK_N query rows x one split of the key tiles (splits fill the device:
PROGRAMS_PER_SM programs per SM); it loops over its key tiles, and each tile's S = Q K^T is a D loop over BLOCK_D
chunks (TMA loads + wgmma on sm_90, software-pipelined by Triton, num_stages deep).
* ``_infonce_fwd_kernel``: online row statistics (max m, sum e^{s-m} over negatives l_neg and over positives l_pos,
  sum of positive logits, #positives) and, if SYMMETRIC, the same per column of every tile, stored as one record per
  (row block, key): the symmetric forward is one pass (1G) for every N (4G forward + backward).  Bank tiles: a
  second launch with IS_BANK (always valid, never positive).
* ``_infonce_merge_kernel``: merges the records of a row (over its splits) or of a column (over the row blocks,
  across row chunks) in a fixed order -> loss, stats.  The loss is the max-shifted, positive-relative form
  ((m - mean_pos s) + log l_pos) + log1p(l_neg / l_pos) where the positives dominate (a 1e-7 loss keeps its digits),
  and the stats keep lse as an fp32 pair lse_hi + lse_lo, so that e^{s - lse} = e^{(s - lse_hi) - lse_lo} stays exact
  at logit scales of 1e4 (issue 9 item 4).
* ``_infonce_pml_kernel`` (pml): a second pass over the tiles that hold a positive -> loss_i and c_i.
* ``_infonce_bwd_kernel``: recomputes each tile with the forward's tiles (so S is bitwise the forward's: the lse pair
  matches it), forms dS x scale, stores it in the input dtype into the dS slab (TMA store) and reduces dscale per
  program; then dQ = dS K and dK = dS^T Q are dense GEMMs (torch.mm -> cuBLAS, fp32 accumulation and output, one
  rounding), each only if its gradient is needed (a MoCo bank without grad: no dbank product).
* ``_siglip_fwd_kernel`` / ``_siglip_bwd_kernel``: the same structure with elementwise epilogues.
Tiles come in three kinds (``_tile_kind``): interior tiles without a positive or an exclusion (all the work of CLIP
but the diagonal) run an epilogue without masks; diagonal / label / edge tiles run in sub-tiles of BLOCK_M / 2
(/ 4 when SYMMETRIC) with masks, which halves their registers; MoCo tiles with nothing valid are skipped.  Mode
flags are constexprs.  No atomics anywhere: every reduction is a fixed-order merge, so every path is bitwise
reproducible (``deterministic`` only pins the slab size to the total device memory); with no atomics left there
is no dK tile for CTAs to collide on, so no rotated key start either.

Numbers (H200 sm_90a, bf16, 128 x 128 x 64 tiles, 8 warps, 3 stages; SASS of the shipped kernels, Triton 3.8 / 3.6)
--------------------------------------------------------------------------------------------------------------------
per full tile: 2 x 128 x 128 x D FLOP (8 x 4 HGMMA.64x128x16 per warp at D = 512), (128 + 128) x D x 2 bytes of
TMA loads (256 KiB at D = 512, from L2).  CLIP forward (symmetric): 193 / 249 registers, 0 spills, 96 KiB shared;
per tile and warp 1,595 instructions outside the D loop + 8 x 72 in it: 130 MUFU (two exponentials per logit: row
and column), 392 SHFL (the column reductions).  Backward (symmetric): 235 / 254 registers, 0 spills, 137 KiB shared;
per tile and warp ~1,500 + 8 x 74 instructions, 128 MUFU, 32 KiB TMA store of dS.  SigLIP forward: 151 registers,
64 MUFU per tile and warp (softplus: one exponential + a degree-8 log1p polynomial, 2e-7 relative).

Why this structure (the options, CLIP N = M = 65,536, D = 512, bf16, H200: 790 TFLOP/s measured dense rate, 4.8 TB/s
HBM, L2 assumed 7.2 TB/s; G = 4.4 TFLOP = 5.6 ms; floor 4G = 22.3 ms)
-----------------------------------------------------------------------------------------------------------------
  backward
  (a) FlashAttention-2/3 style, one kernel, dQ on-chip, dK reduced with (relaxed) fp32 atomics: 3G MMA = 16.7 ms;
      a BLOCK_N x D fp32 dQ on-chip caps BLOCK_N at 64 for D = 512 (128 registers/thread), so dK receives
      (N / 64) M D = 3.4e10 fp32 atomic adds = 137 GB of L2 reductions (+ 69 GB of K tiles): >= 29 ms of L2 traffic.
      Estimate 30-45 ms (L2-bound).
  (b) a row kernel (dQ on-chip) + a column kernel (dK on-chip), no atomics: 4G MMA = 22.3 ms, 137 GB of L2 loads
      (19 ms), 4 exponentials per logit; estimate 25-35 ms (plus the same 64-row dQ register limit).
  (c) [chosen] one tile kernel forms dS once (1G, 2 exponentials per logit; 77 GB of L2: 10.7 ms) into a bf16 slab
      (8.6 GB written, read back once by each GEMM), dQ and dK by cuBLAS (2 x 5.6 ms at the matmul rate):
      estimate 21.9 ms for the backward.
  forward
  (d) [chosen] one pass with row and column records (1G; 69 GB of L2 = 9.6 ms, 0.7 GB of records): 9.6-10.5 ms.
  (e) the row pass plus a column pass with the roles swapped (2G, no records): 19-21 ms.
  Total (c) + (d): 31.7-32.6 ms = 1.43-1.46x the 4G floor (``python -m contrastgen.kernels.roofline``, an estimate);
  the tile passes are L2-bound at 128 x 128 (64 FLOP per L2 byte): 128 x 256 tiles would cut their L2 traffic by a
  quarter but spill in the backward.  SigLIP: 31.5 ms = 1.89x its 3G floor (the O(N)-memory recomputation is 4G).
  Why not keep the Q tile resident (FA style): a 128 x 512 bf16 Q tile is 128 KiB; Triton keeps a loop-invariant
  operand whole (it cannot index the D chunks of a resident tile), so the K tile would be 128 x 512 too: with two
  stages 128 + 256 KiB > 227 KiB on sm_90.  The GEMM-style D loop streams (BLOCK_N + BLOCK_M) x BLOCK_D chunks.

Memory
------
The forward records take 20 (S + 1) rows + 20 (rows / BLOCK_N + 1) M bytes and the dS slab rows x (M + K) itemsize,
rows (a multiple of BLOCK_N) the largest that fits ``workspace_budget`` (WORKSPACE_FRACTION of the free CUDA memory,
at most WORKSPACE_CAP_BYTES; of the total memory in deterministic mode; CPU_WORKSPACE_BYTES on CPU): larger
problems run in row chunks.  At the headline: one chunk, 0.7 GB of records, an 8.6 GB slab.  Beyond that
O((N + M + K) D) (the fp32 gradient accumulators).

Tiles per architecture (``TILE_CONFIGS``, the same tile for every pass of a call): sm_90 128 x 128 x 64 (16-bit) and
128 x 64 x 32 (fp32, tf32x3: three tf32 products), both on wgmma; rows of D * itemsize bytes not a multiple of 16
(no TMA) 64 x 64; sm_80 (no TMA, mma.sync) 64 x 64 x 32 and 64 x 32 x 16.

Non-finite inputs: "-inf" is the finite NEG = -1e30 (empty sets: lse = NEG, loss 0, zero gradient); a NaN / Inf logit
is never an empty set (the empty test is l == 0, which NaN fails) and propagates to the loss, the stats and every
gradient entry it touches (the dense GEMMs propagate NaN through zero entries of dS, as the reference does).
2026-11-24: the Triton interpreter computes bf16 ``tl.dot`` wrongly (upstream issue 11584): under TRITON_INTERPRET=1
the constexpr UPCAST converts the dot operands to fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._aot import AotConfig

NEG = tl.constexpr(-1.0e30)  # the finite "-inf" of the contract (any value <= -1e30 means an empty set);
# a tl.constexpr global: plain module globals cannot be read inside @triton.jit (caught by the AOT test)
NF = 5                       # fields of a record: max, l_neg, l_pos, sum of positive logits, #positives
STATS_COLUMNS = 4            # row/col stats: [lse_hi, npos, lse_lo, pml coefficient c_i]
# Under the interpreter a tuple tl.reduce runs its combine function in Python per element (slow): the kernels sum
# separately there.  A tl.constexpr global, so the compiled kernels read it too (False: compiled).
_INTERPRETER = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _deterministic(flag) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get("CONTRASTGEN_DETERMINISTIC", "0") == "1"


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_m: int
    block_d: int
    num_warps: int
    num_stages: int


# (architecture, precision, TMA) -> tile.  TMA (sm_90 only): tensor descriptors, for rows of D * itemsize bytes a
# multiple of 16; otherwise masked pointer loads (cp.async), which need more registers: smaller tiles (sm_80, odd D).
# Every entry compiles with zero spills for its architecture under the CI's Triton and Triton 3.6
# (tests/test_aot_compile.py); on sm_90 every product of the 16-bit tiles is a wgmma (m64 per warpgroup).
TILE_CONFIGS: Dict[Tuple[int, str, bool], TileConfig] = {
    (90, "16bit", True): TileConfig(128, 128, 64, 8, 3),
    (90, "fp32", True): TileConfig(128, 64, 32, 8, 3),
    (90, "16bit", False): TileConfig(64, 64, 64, 4, 3),
    (90, "fp32", False): TileConfig(64, 64, 32, 4, 3),
    (80, "16bit", False): TileConfig(64, 64, 32, 4, 3),
    (80, "fp32", False): TileConfig(64, 32, 16, 4, 2),
}
INTERPRET_TILE = TileConfig(64, 64, 64, 4, 1)   # few, large tiles keep the interpreter fast
MERGE_BLOCK = 256
# Tests set this to an architecture (80 or 90) to run that architecture's GPU tiles under the interpreter.
INTERPRET_WITH_GPU_CONFIGS: Optional[int] = None
# Programs aimed at per launch (splits of the key tiles per row block), per SM on CUDA; tests may force splits.
PROGRAMS_PER_SM = 4
FORCE_SPLITS: Optional[int] = None
# Workspace (dS slab + forward records): see the module docstring.
WORKSPACE_FRACTION = 0.125
WORKSPACE_CAP_BYTES = 16 * 2 ** 30
CPU_WORKSPACE_BYTES = 64 * 2 ** 20
FORCE_WORKSPACE_BYTES: Optional[int] = None    # tests: force row chunks


def _precision(dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _arch(device) -> int:
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _target_arch(device) -> int:
    """The architecture whose tiles a call uses (under the interpreter: INTERPRET_WITH_GPU_CONFIGS, else sm_90's
    TMA choice with the interpreter's tile)."""
    if _interpreting():
        return INTERPRET_WITH_GPU_CONFIGS or 90
    return _arch(device)


def use_tma(d: int, dtype, device) -> bool:
    return _target_arch(device) >= 90 and _tma_ok(d, torch.empty(0, dtype=dtype).element_size())


def tile_config(dtype, device, d: int) -> TileConfig:
    """The tile every pass of a call uses (the interpreter's, unless INTERPRET_WITH_GPU_CONFIGS)."""
    if _interpreting() and INTERPRET_WITH_GPU_CONFIGS is None:
        return INTERPRET_TILE
    return TILE_CONFIGS[(_target_arch(device), _precision(dtype), use_tma(d, dtype, device))]


def _tma_ok(d: int, itemsize: int) -> bool:
    """Tensor descriptors need 16-byte aligned rows (D * itemsize a multiple of 16)."""
    return (d * itemsize) % 16 == 0


def _block_d(D: int, cfg: TileConfig) -> int:
    return max(16, min(cfg.block_d, triton.next_power_of_2(D)))


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _splits(row_blocks: int, n_tiles: int, device=None, sms: Optional[int] = None) -> int:
    """Splits of the key tiles per row block: enough programs to fill the device (PROGRAMS_PER_SM per SM)."""
    if n_tiles == 0:
        return 0
    if FORCE_SPLITS is not None:
        return max(1, min(FORCE_SPLITS, n_tiles))
    want = triton.cdiv(PROGRAMS_PER_SM * (sms if sms is not None else _num_sms(device)), max(row_blocks, 1))
    return max(1, min(want, n_tiles))


def workspace_budget(device, deterministic: bool) -> int:
    """Bytes the launchers may use for the dS slab / forward records (see the module docstring)."""
    if FORCE_WORKSPACE_BYTES is not None:
        return FORCE_WORKSPACE_BYTES
    if device.type != "cuda":
        return CPU_WORKSPACE_BYTES
    if deterministic:
        avail = torch.cuda.get_device_properties(device).total_memory
    else:
        free, _ = torch.cuda.mem_get_info(device)
        avail = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(min(WORKSPACE_CAP_BYTES, WORKSPACE_FRACTION * avail))


def _chunk_rows(n: int, block_n: int, bytes_per_row: float, fixed_bytes: float, budget: int) -> int:
    """Largest multiple of block_n (at least block_n, at most n rounded up) whose workspace fits the budget."""
    rows = int((budget - fixed_bytes) // max(bytes_per_row, 1))
    rows = max(block_n, rows // block_n * block_n)
    return min(rows, triton.cdiv(n, block_n) * block_n)


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:  # 2026-11-24: interpreter bf16 tl.dot bug (triton issue 11584): compute in fp32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif FP32_DOT:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _operands(q_ptr, k_ptr, n_rows, n_cols, D, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              SUB: tl.constexpr, TMA: tl.constexpr):
    """(Q, K, K by sub-tiles of SUB keys) as tensor descriptors (TMA: loads without address registers or masks; out-of-range
    reads are zeros), else the pointers (masked loads, for D * itemsize not a multiple of 16)."""
    if TMA:
        qs = tl.make_tensor_descriptor(q_ptr, shape=[n_rows, D], strides=[D, 1], block_shape=[BLOCK_N, BLOCK_D])
        ks = tl.make_tensor_descriptor(k_ptr, shape=[n_cols, D], strides=[D, 1], block_shape=[BLOCK_M, BLOCK_D])
        kh = tl.make_tensor_descriptor(k_ptr, shape=[n_cols, D], strides=[D, 1], block_shape=[SUB, BLOCK_D])
    else:
        qs = q_ptr
        ks = k_ptr
        kh = k_ptr
    return qs, ks, kh


@triton.jit
def _qk_tile(qs, ks, row_lo, col_lo, n_rows, n_cols, D,
             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
             FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Q[row_lo:+BLOCK_N] K[col_lo:+BLOCK_M]^T (BLOCK_N, BLOCK_M) in fp32: a D loop over BLOCK_D chunks, software
    pipelined by Triton (rows / columns out of range read zeros).  2 BLOCK_N BLOCK_M D FLOP, (BLOCK_N + BLOCK_M) D
    itemsize bytes of loads (from L2: Q and K stay resident there across the programs of a wave)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if TMA:
        for d0 in range(0, D, BLOCK_D):
            qa = qs.load([row_lo, d0])                                                 # (BLOCK_N, BLOCK_D)
            ka = ks.load([col_lo, d0])                                                 # (BLOCK_M, BLOCK_D)
            acc = _dot(qa, tl.trans(ka), acc, FP32_DOT, UPCAST)  # (BLOCK_N, BLOCK_D) x (BLOCK_D, BLOCK_M)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        rows = row_lo + tl.arange(0, BLOCK_N)
        cols = col_lo + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        cmask = cols < n_cols
        q_ptrs = qs + rows[:, None] * D + offs_d[None, :]
        k_ptrs = ks + cols[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, BLOCK_D):
            dmask = (d0 + offs_d) < D
            qa = tl.load(q_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)     # (BLOCK_N, BLOCK_D)
            ka = tl.load(k_ptrs, mask=cmask[:, None] & dmask[None, :], other=0.0)     # (BLOCK_M, BLOCK_D)
            acc = _dot(qa, tl.trans(ka), acc, FP32_DOT, UPCAST)  # (BLOCK_N, BLOCK_D) x (BLOCK_D, BLOCK_M)
            q_ptrs += BLOCK_D
            k_ptrs += BLOCK_D
    return acc


@triton.jit
def _store_ds(dst, tile, row_lo, col_lo, n_rows, n_cols, stride, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
              TMA: tl.constexpr):
    """slab[row_lo:+BLOCK_N, col_lo:+BLOCK_M] = tile in the slab's dtype (out-of-range entries dropped); TMA: dst is
    a tensor descriptor (a bulk store, no address registers), else the slab pointer."""
    if TMA:
        dst.store([row_lo, col_lo], tile.to(dst.dtype))
    else:
        rows = row_lo + tl.arange(0, BLOCK_N)
        cols = col_lo + tl.arange(0, BLOCK_M)
        ptrs = dst + rows.to(tl.int64)[:, None] * stride + cols[None, :]
        tl.store(ptrs, tile.to(dst.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _tile_masks(rows_g, cols, row_ok, col_ok, ql, kl_ptr,
                HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, IN_BATCH_NEG: tl.constexpr):
    """(positive, valid) masks of an in-batch tile (global row / key indices); out-of-range entries are neither."""
    inb = row_ok[:, None] & col_ok[None, :]
    same = rows_g[:, None] == cols[None, :]
    if HAS_LABELS:
        kl = tl.load(kl_ptr + cols, mask=col_ok, other=0)
        pos = (ql[:, None] == kl[None, :]) & inb
    else:
        pos = same & inb
    if EXCLUDE_SELF:
        valid = inb & (~same)
        pos = pos & valid
    else:
        valid = inb
    if not IN_BATCH_NEG:
        valid = pos
    return pos, valid


@triton.jit
def _tile_kind(row_lo, n_rows_valid, col_lo, n_cols, row_g_lo, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
               HAS_LABELS: tl.constexpr, IN_BATCH_NEG: tl.constexpr, IS_BANK: tl.constexpr):
    """0: interior tile, every entry valid, none positive: full tile, no masks;  1: general (a positive, an
    exclusion or an edge): two half tiles with masks (half the registers);  2: nothing valid (MoCo without in-batch
    negatives, off the diagonal): skipped."""
    edge = (row_lo + BLOCK_N > n_rows_valid) | (col_lo + BLOCK_M > n_cols)
    if IS_BANK:
        kind = tl.where(edge, 1, 0)
    elif HAS_LABELS:
        kind = 1
    else:
        diag = (row_g_lo < col_lo + BLOCK_M) & (col_lo < row_g_lo + BLOCK_N)
        if IN_BATCH_NEG:
            kind = tl.where(diag | edge, 1, 0)
        else:
            kind = tl.where(diag, 1, 2)
    return kind


@triton.jit
def _exp(x):
    """e^x as ex2.approx.ftz of x log2(e): one MUFU.EX2 and one FMUL (tl.exp adds ~3 instructions per element to
    scale denormal results, which only ever enter sums of terms >= 1 here).  2026-12-01: inline PTX; the
    interpreter cannot run it and takes tl.exp."""
    if _INTERPRETER:
        return tl.exp(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _log1p(x):
    """log(1 + x) for 0 <= x <= 1 to 2e-7 relative error: x P(x) with P a degree-8 fit of log1p(x) / x (9 FMA-class
    instructions; log(1 + x) would lose the digits of a small x, and the Goldberg correction log(u) x / (u - 1)
    costs a libdevice log and a division per element)."""
    p = 0.0051058256
    p = p * x - 0.028991956
    p = p * x + 0.07738074
    p = p * x - 0.135906
    p = p * x + 0.1907131
    p = p * x - 0.24833946
    p = p * x + 0.33317935
    p = p * x - 0.49999437
    p = p * x + 0.99999994
    return p * x


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}) (e^{-|x|} in (0, 1]); NaN propagates (tl.maximum may drop it)."""
    return tl.maximum(x, 0.0) + _log1p(_exp(-tl.abs(x))) + tl.where(x == x, 0.0, x)


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _sum4(a, b, c, d, axis: tl.constexpr):
    """Four sums along ``axis`` as one tuple reduction (four tl.sum calls cost ~100 more registers per thread)."""
    if _INTERPRETER:
        return tl.sum(a, axis), tl.sum(b, axis), tl.sum(c, axis), tl.sum(d, axis)
    else:
        return tl.reduce((a, b, c, d), axis, _add4)


@triton.jit
def _store_record(ptr, field, idx, mask, r0, r1, r2, r3, r4):
    tl.store(ptr + idx, r0, mask=mask)
    tl.store(ptr + field + idx, r1, mask=mask)
    tl.store(ptr + 2 * field + idx, r2, mask=mask)
    tl.store(ptr + 3 * field + idx, r3, mask=mask)
    tl.store(ptr + 4 * field + idx, r4, mask=mask)


@triton.jit
def _fast_update(s, m, ln, lp, col_base, col_field, cols, SYMMETRIC: tl.constexpr):
    """A tile whose entries are all valid and none positive: online row statistics and the column record, without
    masks.  Per logit: 1 (2 if SYMMETRIC) exponentials, ~8 other instructions."""
    if SYMMETRIC:
        cm = tl.max(s, 0)
        cln = tl.sum(_exp(s - cm[None, :]), 0)
        zero = tl.zeros_like(cln)
        _store_record(col_base, col_field, cols, cols >= 0, cm, cln, zero, zero, zero)
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = _exp(m - m_new)
    ln = ln * alpha + tl.sum(_exp(s - m_new[:, None]), 1)
    return m_new, ln, lp * alpha


@triton.jit
def _general_update(s, pos, valid, m, ln, lp, ps, npos, col_base, col_field, cols, col_ok,
                    HAS_POS: tl.constexpr, PML: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Online row statistics and (SYMMETRIC) the column record of a (half) tile with masks.  supcon: the max and the
    sums run over the valid entries, split in negatives (ln) and positives (lp); pml: over the valid negatives only
    (the lse of the pml loss)."""
    if HAS_POS and PML:
        sv = tl.where(valid & (~pos), s, NEG)
    else:
        sv = tl.where(valid, s, NEG)
    if SYMMETRIC:  # supcon only
        cm = tl.max(sv, 0)
        pc = _exp(sv - cm[None, :])
        ppc = tl.where(pos, pc, 0.0)
        c1, c2, c3, c4 = _sum4(pc - ppc, ppc, tl.where(pos, s, 0.0), pos.to(tl.float32), 0)
        _store_record(col_base, col_field, cols, col_ok, cm, c1, c2, c3, c4)
    m_new = tl.maximum(m, tl.max(sv, 1))
    alpha = _exp(m - m_new)
    p = _exp(sv - m_new[:, None])
    if HAS_POS:
        if PML:
            a, b, c, d = _sum4(tl.zeros_like(p), p, tl.where(pos, s, 0.0), pos.to(tl.float32), 1)
        else:
            pp = tl.where(pos, p, 0.0)
            a, b, c, d = _sum4(pp, p - pp, tl.where(pos, s, 0.0), pos.to(tl.float32), 1)
        return m_new, ln * alpha + b, lp * alpha + a, ps + c, npos + d
    else:
        return m_new, ln * alpha + tl.sum(p, 1), lp * alpha, ps, npos


# ----------------------------------------------------------------------------------------------- InfoNCE
@triton.jit
def _infonce_fwd_kernel(q_ptr, k_ptr, scale_ptr, ql_ptr, kl_ptr, row_rec_ptr, col_rec_ptr,
                        R, row0, n_cols, D, tiles_per_split, row_part0, row_n_parts, col_n_parts,
                        HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, IN_BATCH_NEG: tl.constexpr,
                        PML: tl.constexpr, SYMMETRIC: tl.constexpr, IS_BANK: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
                        FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """Row (and, SYMMETRIC, column) records of one block of BLOCK_N query rows over one split of the key tiles.

    q_ptr points at the chunk's first row (global row = row0 + local row); k_ptr at the in-batch keys (or the bank,
    IS_BANK).  Row record -> row_rec[f, row_part0 + split, local row] (f = max, l_neg, l_pos, possum, npos);
    column record of each tile -> col_rec[f, 1 + row block, key] (part 0 is the running record of earlier chunks).
    Per tile: 2 BLOCK_N BLOCK_M D FLOP; 1 (2 if SYMMETRIC) exponentials per logit."""
    HALF: tl.constexpr = BLOCK_M // 4 if (SYMMETRIC and BLOCK_M >= 64) else BLOCK_M // 2   # general sub-tiles
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_r * BLOCK_N
    rows = row_lo + tl.arange(0, BLOCK_N)
    rows_g = row0 + rows
    row_ok = rows < R
    scale = tl.load(scale_ptr)
    qs, ks, kh = _operands(q_ptr, k_ptr, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, HALF, TMA)
    if HAS_LABELS and not IS_BANK:
        ql = tl.load(ql_ptr + rows_g, mask=row_ok, other=0)
    else:
        ql = rows_g
    n_tiles = tl.cdiv(n_cols, BLOCK_M)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    m = tl.full((BLOCK_N,), NEG, tl.float32)
    ln = tl.zeros((BLOCK_N,), tl.float32)
    lp = tl.zeros((BLOCK_N,), tl.float32)
    ps = tl.zeros((BLOCK_N,), tl.float32)
    npos = tl.zeros((BLOCK_N,), tl.float32)
    col_stride = n_cols.to(tl.int64)
    col_base = col_rec_ptr + (1 + pid_r).to(tl.int64) * col_stride
    col_field = col_n_parts.to(tl.int64) * col_stride
    for t in range(t_lo, t_hi):
        col_lo = t * BLOCK_M
        kind = _tile_kind(row_lo, R, col_lo, n_cols, row0 + row_lo, BLOCK_N, BLOCK_M, HAS_LABELS, IN_BATCH_NEG,
                          IS_BANK)
        if kind == 0:
            s = scale * _qk_tile(qs, ks, row_lo, col_lo, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, TMA, FP32_DOT,
                                 UPCAST)
            m, ln, lp = _fast_update(s, m, ln, lp, col_base, col_field, col_lo + tl.arange(0, BLOCK_M),
                                     SYMMETRIC and not IS_BANK)
        elif kind == 1:
            for h in tl.static_range(BLOCK_M // HALF):   # (names of half-tile values differ from the full tile's: Triton types)
                c_lo = col_lo + h * HALF
                hcols = c_lo + tl.arange(0, HALF)
                hok = hcols < n_cols
                hs = scale * _qk_tile(qs, kh, row_lo, c_lo, R, n_cols, D, BLOCK_N, HALF, BLOCK_D, TMA, FP32_DOT,
                                      UPCAST)
                if IS_BANK:
                    valid = row_ok[:, None] & hok[None, :]
                    m, ln, lp, ps, npos = _general_update(hs, valid, valid, m, ln, lp, ps, npos, col_base, col_field,
                                                          hcols, hok, False, False, False)
                else:
                    pos, valid = _tile_masks(rows_g, hcols, row_ok, hok, ql, kl_ptr, HAS_LABELS, EXCLUDE_SELF,
                                             IN_BATCH_NEG)
                    m, ln, lp, ps, npos = _general_update(hs, pos, valid, m, ln, lp, ps, npos, col_base, col_field,
                                                          hcols, hok, True, PML, SYMMETRIC)
        elif SYMMETRIC:  # nothing valid in this tile: empty column records
            ecols = col_lo + tl.arange(0, BLOCK_M)
            zero = tl.zeros((BLOCK_M,), tl.float32)
            _store_record(col_base, col_field, ecols, ecols < n_cols, zero + NEG, zero, zero, zero, zero)
    base = row_rec_ptr + (row_part0 + pid_s).to(tl.int64) * R + rows
    _store_record(base, row_n_parts.to(tl.int64) * R, 0, row_ok, m, ln, lp, ps, npos)


@triton.jit
def _infonce_merge_kernel(rec_ptr, n_parts, parts_stride, count, loss_ptr, stats_ptr, PML: tl.constexpr,
                          FINAL: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the first n_parts records (of parts_stride allocated) of each of ``count`` rows (or columns) in part
    order (deterministic).

    FINAL: loss (supcon) and stats [lse_hi, npos, lse_lo, 0] with lse = max + log(l_neg + l_pos) kept as an fp32 pair
    and loss = ((max - mean_pos) + log l_pos) + log1p(l_neg / l_pos) where the positives dominate, else
    (max - mean_pos) + log(l_neg + l_pos); 0 without a positive.  Not FINAL: the merged record -> part 0."""
    idx = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = idx < count
    stride = count.to(tl.int64)
    field = parts_stride.to(tl.int64) * stride
    m = tl.full((BLOCK_C,), NEG, tl.float32)
    ln = tl.zeros((BLOCK_C,), tl.float32)
    lp = tl.zeros((BLOCK_C,), tl.float32)
    ps = tl.zeros((BLOCK_C,), tl.float32)
    npos = tl.zeros((BLOCK_C,), tl.float32)
    for p in range(0, n_parts):
        base = rec_ptr + p * stride + idx
        mp = tl.load(base, mask=ok, other=NEG)
        m_new = tl.maximum(m, mp)
        a = _exp(m - m_new)
        b = _exp(mp - m_new)
        ln = ln * a + tl.load(base + field, mask=ok, other=0.0) * b
        lp = lp * a + tl.load(base + 2 * field, mask=ok, other=0.0) * b
        ps += tl.load(base + 3 * field, mask=ok, other=0.0)
        npos += tl.load(base + 4 * field, mask=ok, other=0.0)
        m = m_new
    if FINAL:
        total = ln + lp
        empty = total == 0.0   # an empty set; a NaN total is not empty and propagates
        log_total = tl.log(tl.where(empty, 1.0, total))
        lse_hi = tl.where(empty, NEG, m + log_total)
        lse_lo = tl.where(empty, 0.0, (m - lse_hi) + log_total)
        if not PML:
            r = ps / tl.maximum(npos, 1.0)
            lp_safe = tl.where(lp > 0.0, lp, 1.0)
            dominant = lp > ln
            loss_dom = ((m - r) + tl.log(lp_safe)) + _log1p(tl.where(dominant, ln / lp_safe, 0.0))
            loss_gen = (m - r) + log_total
            loss = tl.where(npos > 0.0, tl.where(dominant, loss_dom, loss_gen), 0.0)
            tl.store(loss_ptr + idx, loss, mask=ok)
        out = stats_ptr + idx * 4
        tl.store(out, lse_hi, mask=ok)
        tl.store(out + 1, npos, mask=ok)
        tl.store(out + 2, lse_lo, mask=ok)
        tl.store(out + 3, tl.zeros_like(lse_lo), mask=ok)
    else:
        _store_record(rec_ptr, field, idx, ok, m, ln, lp, ps, npos)


@triton.jit
def _infonce_pml_kernel(q_ptr, k_ptr, scale_ptr, ql_ptr, kl_ptr, row_stats_ptr, out_ptr,
                        R, row0, n_cols, D, tiles_per_split, n_splits,
                        HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, IN_BATCH_NEG: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
                        FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """pml, second pass over the in-batch half tiles that hold a positive (the others are skipped before their
    product; the half tiles are the forward's general tiles, so S is the forward's):  x_ip = lse_i - s_ip (lse over
    the negatives, from the fp32 pair of the stats);  out[0, split, row] = sum_p softplus(x_ip) (the loss),
    out[1, split, row] = sum_p sigmoid(x_ip) (c_i)."""
    HALF: tl.constexpr = BLOCK_M // 2
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_r * BLOCK_N
    rows = row_lo + tl.arange(0, BLOCK_N)
    rows_g = row0 + rows
    row_ok = rows < R
    scale = tl.load(scale_ptr)
    qs, ks, kh = _operands(q_ptr, k_ptr, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, HALF, TMA)
    lse_hi = tl.load(row_stats_ptr + rows_g * 4, mask=row_ok, other=0.0)
    lse_lo = tl.load(row_stats_ptr + rows_g * 4 + 2, mask=row_ok, other=0.0)
    if HAS_LABELS:
        ql = tl.load(ql_ptr + rows_g, mask=row_ok, other=0)
    else:
        ql = rows_g
    loss = tl.zeros((BLOCK_N,), tl.float32)
    coef = tl.zeros((BLOCK_N,), tl.float32)
    n_tiles = tl.cdiv(n_cols, HALF)
    t_lo = pid_s * tiles_per_split * 2
    t_hi = tl.minimum(t_lo + tiles_per_split * 2, n_tiles)
    for t in range(t_lo, t_hi):
        c_lo = t * HALF
        cols = c_lo + tl.arange(0, HALF)
        col_ok = cols < n_cols
        pos, valid = _tile_masks(rows_g, cols, row_ok, col_ok, ql, kl_ptr, HAS_LABELS, EXCLUDE_SELF, IN_BATCH_NEG)
        if tl.max(pos.to(tl.int32)) > 0:
            s = scale * _qk_tile(qs, kh, row_lo, c_lo, R, n_cols, D, BLOCK_N, HALF, BLOCK_D, TMA, FP32_DOT, UPCAST)
            x = tl.where(pos, (lse_hi[:, None] - s) + lse_lo[:, None], 0.0)
            loss += tl.sum(tl.where(pos, _softplus(x), 0.0), 1)
            coef += tl.sum(tl.where(pos, tl.sigmoid(x), 0.0), 1)
    base = out_ptr + pid_s.to(tl.int64) * R + rows
    tl.store(base, loss, mask=row_ok)
    tl.store(base + n_splits.to(tl.int64) * R, coef, mask=row_ok)


@triton.jit
def _bwd_general(s, rows_g, cols, row_ok, col_ok, ql, kl_ptr, lse_hi, lse_lo, has_pos, gc, gp, col_stats_ptr,
                 g_col_ptr, HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, IN_BATCH_NEG: tl.constexpr,
                 PML: tl.constexpr, SYMMETRIC: tl.constexpr, IS_BANK: tl.constexpr):
    """dS of a (half) tile with masks (see _infonce_bwd_kernel)."""
    if IS_BANK:
        valid = row_ok[:, None] & col_ok[None, :]
        p = _exp(tl.where(valid, (s - lse_hi[:, None]) - lse_lo[:, None], NEG))
        ds = tl.where(has_pos[:, None], gc[:, None] * p, 0.0)
    else:
        pos, valid = _tile_masks(rows_g, cols, row_ok, col_ok, ql, kl_ptr, HAS_LABELS, EXCLUDE_SELF, IN_BATCH_NEG)
        if PML:
            p = _exp(tl.where(valid & (~pos), (s - lse_hi[:, None]) - lse_lo[:, None], NEG))
            r = tl.sigmoid(tl.where(pos, (lse_hi[:, None] - s) + lse_lo[:, None], 0.0))
            ds = gc[:, None] * p - tl.where(pos, gp[:, None] * r, 0.0)
        else:
            p = _exp(tl.where(valid, (s - lse_hi[:, None]) - lse_lo[:, None], NEG))
            ds = tl.where(has_pos[:, None], gc[:, None] * p - tl.where(pos, gp[:, None], 0.0), 0.0)
        if SYMMETRIC:
            clse_hi = tl.load(col_stats_ptr + cols * 4, mask=col_ok, other=0.0)
            cnpos = tl.load(col_stats_ptr + cols * 4 + 1, mask=col_ok, other=0.0)
            clse_lo = tl.load(col_stats_ptr + cols * 4 + 2, mask=col_ok, other=0.0)
            cg = tl.load(g_col_ptr + cols, mask=col_ok, other=0.0)
            cgp = cg / tl.maximum(cnpos, 1.0)
            pc = _exp(tl.where(valid, (s - clse_hi[None, :]) - clse_lo[None, :], NEG))
            ds += tl.where((cnpos > 0.0)[None, :], cg[None, :] * pc - tl.where(pos, cgp[None, :], 0.0), 0.0)
    return ds


@triton.jit
def _infonce_bwd_kernel(q_ptr, k_ptr, scale_ptr, ql_ptr, kl_ptr, row_stats_ptr, col_stats_ptr, g_row_ptr, g_col_ptr,
                        ds_ptr, ds_stride, dscale_ptr, R, row0, n_cols, D, tiles_per_split,
                        HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, IN_BATCH_NEG: tl.constexpr,
                        PML: tl.constexpr, SYMMETRIC: tl.constexpr, IS_BANK: tl.constexpr, STORE_DS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
                        FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """dS (x scale, in the dtype of ds_ptr) of one block of BLOCK_N rows over one split of the key tiles -> the slab
    ds[local row, key]; dscale = sum dS_ij q_i.k_j -> dscale[program].  The tiles (hence S) are the forward's.

    supcon: dS = [npos_i > 0] g_i (e^{s - lse_i}[valid] - [pos] / npos_i)  (+ the same per column, SYMMETRIC)
    pml:    dS = g_i (c_i e^{s - lse_i}[valid, not pos] - sigmoid(lse_i - s)[pos])
    with s - lse computed as (s - lse_hi) - lse_lo.  Per tile: 2 BLOCK_N BLOCK_M D FLOP, 1 (2 if SYMMETRIC)
    exponentials per logit, BLOCK_N BLOCK_M itemsize bytes stored."""
    HALF: tl.constexpr = BLOCK_M // 4 if (SYMMETRIC and BLOCK_M >= 64) else BLOCK_M // 2   # general sub-tiles
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_r * BLOCK_N
    rows = row_lo + tl.arange(0, BLOCK_N)
    rows_g = row0 + rows
    row_ok = rows < R
    scale = tl.load(scale_ptr)
    qs, ks, kh = _operands(q_ptr, k_ptr, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, HALF, TMA)
    lse_hi = tl.load(row_stats_ptr + rows_g * 4, mask=row_ok, other=0.0)
    npos = tl.load(row_stats_ptr + rows_g * 4 + 1, mask=row_ok, other=0.0)
    lse_lo = tl.load(row_stats_ptr + rows_g * 4 + 2, mask=row_ok, other=0.0)
    g = tl.load(g_row_ptr + rows_g, mask=row_ok, other=0.0)
    if PML:
        gc = g * tl.load(row_stats_ptr + rows_g * 4 + 3, mask=row_ok, other=0.0)   # g_i c_i
        has_pos = row_ok
        gp = g
    else:
        gc = g
        has_pos = npos > 0.0
        gp = g / tl.maximum(npos, 1.0)
    if HAS_LABELS and not IS_BANK:
        ql = tl.load(ql_ptr + rows_g, mask=row_ok, other=0)
    else:
        ql = rows_g
    if STORE_DS and TMA:
        ds_full = tl.make_tensor_descriptor(ds_ptr, shape=[R, n_cols], strides=[ds_stride, 1],
                                            block_shape=[BLOCK_N, BLOCK_M])
        ds_half = tl.make_tensor_descriptor(ds_ptr, shape=[R, n_cols], strides=[ds_stride, 1],
                                            block_shape=[BLOCK_N, HALF])
    else:
        ds_full = ds_ptr
        ds_half = ds_ptr
    dscale = tl.zeros((BLOCK_N,), tl.float32)   # sum dS s (/ scale at the end: no Q K^T tile kept live)
    n_tiles = tl.cdiv(n_cols, BLOCK_M)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        col_lo = t * BLOCK_M
        kind = _tile_kind(row_lo, R, col_lo, n_cols, row0 + row_lo, BLOCK_N, BLOCK_M, HAS_LABELS, IN_BATCH_NEG,
                          IS_BANK)
        if kind == 0:  # every entry valid, none positive: no masks
            s = scale * _qk_tile(qs, ks, row_lo, col_lo, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, TMA, FP32_DOT,
                                 UPCAST)
            ds = tl.where(has_pos[:, None], gc[:, None] * _exp((s - lse_hi[:, None]) - lse_lo[:, None]), 0.0)
            if SYMMETRIC and not IS_BANK:
                cols = col_lo + tl.arange(0, BLOCK_M)
                clse_hi = tl.load(col_stats_ptr + cols * 4)
                cnpos = tl.load(col_stats_ptr + cols * 4 + 1)
                clse_lo = tl.load(col_stats_ptr + cols * 4 + 2)
                cg = tl.load(g_col_ptr + cols)
                ds += tl.where((cnpos > 0.0)[None, :], cg[None, :] * _exp((s - clse_hi[None, :]) - clse_lo[None, :]),
                               0.0)
            dscale += tl.sum(ds * s, 1)
            if STORE_DS:
                _store_ds(ds_full, ds * scale, row_lo, col_lo, R, n_cols, ds_stride, BLOCK_N, BLOCK_M, TMA)
        elif kind == 1:
            for h in tl.static_range(BLOCK_M // HALF):   # (names of half-tile values differ from the full tile's: Triton types)
                c_lo = col_lo + h * HALF
                hcols = c_lo + tl.arange(0, HALF)
                hs = scale * _qk_tile(qs, kh, row_lo, c_lo, R, n_cols, D, BLOCK_N, HALF, BLOCK_D, TMA, FP32_DOT,
                                      UPCAST)
                hds = _bwd_general(hs, rows_g, hcols, row_ok, hcols < n_cols, ql, kl_ptr, lse_hi, lse_lo, has_pos,
                                   gc, gp, col_stats_ptr, g_col_ptr, HAS_LABELS, EXCLUDE_SELF, IN_BATCH_NEG, PML,
                                   SYMMETRIC, IS_BANK)
                dscale += tl.sum(hds * hs, 1)
                if STORE_DS:
                    _store_ds(ds_half, hds * scale, row_lo, c_lo, R, n_cols, ds_stride, BLOCK_N, HALF, TMA)
        elif STORE_DS:  # nothing valid: dS = 0
            _store_ds(ds_full, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), row_lo, col_lo, R, n_cols, ds_stride,
                      BLOCK_N, BLOCK_M, TMA)
    tl.store(dscale_ptr + pid_r * tl.num_programs(1) + pid_s, tl.sum(dscale, 0) / scale)


# ----------------------------------------------------------------------------------------------- SigLIP
@triton.jit
def _siglip_fwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, out_ptr, R, row0, n_cols, D, tiles_per_split,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
                       FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """out[split, row] = sum_j softplus(-y_ij z_ij) over one split of the key tiles, z = scale q.k + bias,
    y_ii = +1 else -1.  Per tile: 2 BLOCK_N BLOCK_M D FLOP, one exp and one log per logit."""
    HALF: tl.constexpr = BLOCK_M // 2
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_r * BLOCK_N
    rows = row_lo + tl.arange(0, BLOCK_N)
    rows_g = row0 + rows
    row_ok = rows < R
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    qs, ks, kh = _operands(q_ptr, k_ptr, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, HALF, TMA)
    loss = tl.zeros((BLOCK_N,), tl.float32)
    n_tiles = tl.cdiv(n_cols, BLOCK_M)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        col_lo = t * BLOCK_M
        kind = _tile_kind(row_lo, R, col_lo, n_cols, row0 + row_lo, BLOCK_N, BLOCK_M, False, True, False)
        if kind == 0:  # interior, off the diagonal: y = -1
            z = scale * _qk_tile(qs, ks, row_lo, col_lo, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, TMA, FP32_DOT,
                                 UPCAST) + bias
            loss += tl.sum(_softplus(z), 1)
        else:
            for h in tl.static_range(BLOCK_M // HALF):
                c_lo = col_lo + h * HALF
                hcols = c_lo + tl.arange(0, HALF)
                hz = scale * _qk_tile(qs, kh, row_lo, c_lo, R, n_cols, D, BLOCK_N, HALF, BLOCK_D, TMA, FP32_DOT,
                                      UPCAST) + bias
                x = tl.where(rows_g[:, None] == hcols[None, :], -hz, hz)
                loss += tl.sum(tl.where(row_ok[:, None] & (hcols < n_cols)[None, :], _softplus(x), 0.0), 1)
    tl.store(out_ptr + pid_s.to(tl.int64) * R + rows, loss, mask=row_ok)


@triton.jit
def _siglip_bwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, g_row_ptr, ds_ptr, ds_stride, red_ptr, R, row0, n_cols, D,
                       tiles_per_split, STORE_DS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
                       FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """dZ_ij = -g_i y_ij sigmoid(-y_ij z_ij) (x scale) -> the slab ds[local row, key];
    red[0, program] = sum dZ_ij q_i.k_j (dscale), red[1, program] = sum dZ_ij (dbias)."""
    HALF: tl.constexpr = BLOCK_M // 2
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_r * BLOCK_N
    rows = row_lo + tl.arange(0, BLOCK_N)
    rows_g = row0 + rows
    row_ok = rows < R
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    qs, ks, kh = _operands(q_ptr, k_ptr, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, HALF, TMA)
    g = tl.load(g_row_ptr + rows_g, mask=row_ok, other=0.0)
    if STORE_DS and TMA:
        ds_full = tl.make_tensor_descriptor(ds_ptr, shape=[R, n_cols], strides=[ds_stride, 1],
                                            block_shape=[BLOCK_N, BLOCK_M])
        ds_half = tl.make_tensor_descriptor(ds_ptr, shape=[R, n_cols], strides=[ds_stride, 1],
                                            block_shape=[BLOCK_N, HALF])
    else:
        ds_full = ds_ptr
        ds_half = ds_ptr
    dscale = tl.zeros((BLOCK_N,), tl.float32)   # sum dZ (z - bias) (/ scale at the end)
    dbias = tl.zeros((BLOCK_N,), tl.float32)
    n_tiles = tl.cdiv(n_cols, BLOCK_M)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        col_lo = t * BLOCK_M
        kind = _tile_kind(row_lo, R, col_lo, n_cols, row0 + row_lo, BLOCK_N, BLOCK_M, False, True, False)
        if kind == 0:  # y = -1: dZ = g sigmoid(z)
            s = scale * _qk_tile(qs, ks, row_lo, col_lo, R, n_cols, D, BLOCK_N, BLOCK_M, BLOCK_D, TMA, FP32_DOT,
                                 UPCAST)
            dz = g[:, None] * tl.sigmoid(s + bias)
            dscale += tl.sum(dz * s, 1)
            dbias += tl.sum(dz, 1)
            if STORE_DS:
                _store_ds(ds_full, dz * scale, row_lo, col_lo, R, n_cols, ds_stride, BLOCK_N, BLOCK_M, TMA)
        else:
            for h in tl.static_range(BLOCK_M // HALF):
                c_lo = col_lo + h * HALF
                hcols = c_lo + tl.arange(0, HALF)
                hs = scale * _qk_tile(qs, kh, row_lo, c_lo, R, n_cols, D, BLOCK_N, HALF, BLOCK_D, TMA, FP32_DOT,
                                      UPCAST)
                y = tl.where(rows_g[:, None] == hcols[None, :], 1.0, -1.0)
                hdz = tl.where(row_ok[:, None] & (hcols < n_cols)[None, :],
                               -g[:, None] * y * tl.sigmoid(-y * (hs + bias)), 0.0)
                dscale += tl.sum(hdz * hs, 1)
                dbias += tl.sum(hdz, 1)
                if STORE_DS:
                    _store_ds(ds_half, hdz * scale, row_lo, c_lo, R, n_cols, ds_stride, BLOCK_N, HALF, TMA)
    prog = pid_r * tl.num_programs(1) + pid_s
    tl.store(red_ptr + prog, tl.sum(dscale, 0) / scale)
    tl.store(red_ptr + tl.num_programs(0) * tl.num_programs(1) + prog, tl.sum(dbias, 0))


# ----------------------------------------------------------------------------------------------- launchers
def _kernel_input(t):
    """Contiguous kernel input; float64 (gradcheck, CPU debugging) is computed in float32 -- the
    outputs are float32 by contract, and the gradients are cast back to float64."""
    if t is None:
        return None
    if t.dtype == torch.float64:
        t = t.float()
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {t.dtype}")
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()   # tensor descriptors need 16-byte aligned bases


def _scalar(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(1).to(device=like.device, dtype=torch.float32).contiguous()


def _check_int32_offsets(d, *rows):
    """Tile offsets are int32 (64-bit offsets per element double the address registers)."""
    if max(rows) * d >= 2 ** 31:
        raise ValueError(f"the Triton kernels use 32-bit offsets: rows x D must stay below 2**31, got {max(rows)} x {d}")


def _labels(q_labels, k_labels, q):
    if q_labels is None:
        dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
        return dummy, dummy, False
    return q_labels.to(torch.int64).contiguous(), k_labels.to(torch.int64).contiguous(), True


@dataclass
class _Call:
    """Everything a launch needs that depends on the inputs only."""
    q: torch.Tensor
    k: torch.Tensor
    bank: torch.Tensor          # q as a dummy pointer when there is no bank
    kb: int
    scale: torch.Tensor
    ql: torch.Tensor
    kl: torch.Tensor
    has_labels: bool
    cfg: TileConfig
    const: dict                 # BLOCK_N, BLOCK_M, BLOCK_D, TMA, FP32_DOT, UPCAST, num_warps, num_stages

    @property
    def n(self):
        return self.q.shape[0]

    @property
    def m(self):
        return self.k.shape[0]

    @property
    def d(self):
        return self.q.shape[1]


def _scratch(size: int, alignment: int, stream):
    device = "cuda" if torch.cuda.is_available() and not _interpreting() else "cpu"
    return torch.empty(size, dtype=torch.int8, device=device)


def _ensure_allocator():
    """Device-side tensor descriptors need a small global scratch per program (triton.set_allocator).  The allocator
    is a context variable (per thread: autograd runs the backward on its own threads), set here where none is (a
    user's allocator is kept).  2026-12-01: Triton exposes no public "is an allocator set" query."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _prepare(q, k, bank, scale, q_labels=None, k_labels=None) -> _Call:
    q, k = _kernel_input(q), _kernel_input(k)
    kb = 0 if bank is None else bank.shape[0]
    bank_t = _kernel_input(bank) if kb else q
    n, d = q.shape
    _check_int32_offsets(d, n, k.shape[0], kb)
    ql, kl, has_labels = _labels(q_labels, k_labels, q)
    cfg = tile_config(q.dtype, q.device, d)
    bd = _block_d(d, cfg)
    tma = use_tma(d, q.dtype, q.device)
    if tma:
        _ensure_allocator()
    const = dict(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=bd, TMA=tma,
                 FP32_DOT=q.dtype == torch.float32, UPCAST=_interpreting(), num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)
    return _Call(q, k, bank_t, kb, _scalar(scale, q), ql, kl, has_labels, cfg, const)


def _modes(c: _Call, exclude_self, in_batch_negatives, pml, symmetric) -> dict:
    return dict(HAS_LABELS=c.has_labels, EXCLUDE_SELF=bool(exclude_self), IN_BATCH_NEG=bool(in_batch_negatives),
                PML=bool(pml), SYMMETRIC=bool(symmetric))


# bank tiles are never positive and always valid: one specialization whatever the in-batch mode
_BANK_MODES = dict(HAS_LABELS=False, EXCLUDE_SELF=False, IN_BATCH_NEG=True, SYMMETRIC=False)


def _fwd_chunk_rows(c: _Call, symmetric, budget) -> int:
    tiles = triton.cdiv(c.m, c.cfg.block_m) + triton.cdiv(c.kb, c.cfg.block_m)
    max_splits = min(tiles, PROGRAMS_PER_SM * _num_sms(c.q.device)) if FORCE_SPLITS is None else FORCE_SPLITS
    per_row = 4 * NF * max_splits + (4 * NF * c.m / c.cfg.block_n if symmetric else 0)
    fixed = 4 * NF * 2 * c.m if symmetric else 0
    return _chunk_rows(c.n, c.cfg.block_n, per_row, fixed, budget)


def _merge(rec, n_parts, parts_stride, count, loss, stats, pml, final):
    _infonce_merge_kernel[(triton.cdiv(count, MERGE_BLOCK),)](rec, n_parts, parts_stride, count, loss, stats,
                                                               PML=pml, FINAL=final, BLOCK_C=MERGE_BLOCK)


def _pml_pass(c: _Call, qc, r0, rc, row_stats, modes):
    """(loss, c_i) of rows r0 .. r0 + rc (pml), from the final row stats."""
    t_in = triton.cdiv(c.m, c.cfg.block_m)
    rb = triton.cdiv(rc, c.cfg.block_n)
    splits = _splits(rb, t_in, c.q.device)
    out = torch.empty(2, splits, rc, dtype=torch.float32, device=c.q.device)
    _infonce_pml_kernel[(rb, splits)](qc, c.k, c.scale, c.ql, c.kl, row_stats, out, rc, r0, c.m, c.d,
                                      triton.cdiv(t_in, splits), splits, HAS_LABELS=modes["HAS_LABELS"],
                                      EXCLUDE_SELF=modes["EXCLUDE_SELF"], IN_BATCH_NEG=modes["IN_BATCH_NEG"],
                                      **c.const)
    return out.sum(1)


def infonce_fwd(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric,
                deterministic=None):
    """Fused InfoNCE forward: (row_loss (N,), col_loss (M,) or (0,), row_stats (N, 4), col_stats (M, 4) or (0, 4)),
    float32; stats = [lse_hi, npos, lse_lo, pml coefficient] (the contract's [lse, npos] plus two refinements)."""
    c = _prepare(q, k, bank, scale, q_labels, k_labels)
    n, m, d, dev = c.n, c.m, c.d, c.q.device
    modes = _modes(c, exclude_self, in_batch_negatives, pml, symmetric)
    bn, bm = c.cfg.block_n, c.cfg.block_m
    t_in, t_bank = triton.cdiv(m, bm), triton.cdiv(c.kb, bm)
    rows = _fwd_chunk_rows(c, symmetric, workspace_budget(dev, _deterministic(deterministic)))
    rb_max = triton.cdiv(rows, bn)
    row_loss = torch.zeros(n, dtype=torch.float32, device=dev)
    row_stats = torch.empty(n, STATS_COLUMNS, dtype=torch.float32, device=dev)
    if symmetric:
        col_loss = torch.empty(m, dtype=torch.float32, device=dev)
        col_stats = torch.empty(m, STATS_COLUMNS, dtype=torch.float32, device=dev)
        col_rec = torch.empty(NF, rb_max + 1, m, dtype=torch.float32, device=dev)
        col_rec[:, 0].zero_()
        col_rec[0, 0].fill_(-1e30)   # part 0: the running (empty) record of the chunks before
    else:
        col_loss = torch.zeros(0, dtype=torch.float32, device=dev)
        col_stats = torch.zeros(0, STATS_COLUMNS, dtype=torch.float32, device=dev)
        col_rec = row_loss  # unused
    for r0 in range(0, n, rows):
        rc = min(rows, n - r0)
        rb = triton.cdiv(rc, bn)
        qc = c.q[r0:r0 + rc]
        s_in = _splits(rb, t_in, dev)
        s_bank = _splits(rb, t_bank, dev) if c.kb else 0
        row_rec = torch.empty(NF, s_in + s_bank, rc, dtype=torch.float32, device=dev)
        _infonce_fwd_kernel[(rb, s_in)](qc, c.k, c.scale, c.ql, c.kl, row_rec, col_rec, rc, r0, m, d,
                                        triton.cdiv(t_in, s_in), 0, s_in + s_bank, rb_max + 1, **modes,
                                        IS_BANK=False, **c.const)
        if c.kb:
            _infonce_fwd_kernel[(rb, s_bank)](qc, c.bank, c.scale, c.ql, c.kl, row_rec, col_rec, rc, r0, c.kb, d,
                                              triton.cdiv(t_bank, s_bank), s_in, s_in + s_bank, rb_max + 1,
                                              **_BANK_MODES, PML=False, IS_BANK=True,
                                              **c.const)
        _merge(row_rec, s_in + s_bank, s_in + s_bank, rc, row_loss[r0:], row_stats[r0:], bool(pml), True)
        if pml:
            loss_coef = _pml_pass(c, qc, r0, rc, row_stats, modes)
            row_loss[r0:r0 + rc] = loss_coef[0]
            row_stats[r0:r0 + rc, 3] = loss_coef[1]
        if symmetric:
            last = r0 + rc >= n
            _merge(col_rec, rb + 1, rb_max + 1, m, col_loss, col_stats, False, last)
    return row_loss, col_loss, row_stats, col_stats


def _full_stats(stats, count, device):
    """(count, 4) float32 stats; contract-only (count, 2) stats get lse_lo = 0 and c = 0."""
    stats = stats.to(device=device, dtype=torch.float32)
    if stats.shape[1] >= STATS_COLUMNS:
        return stats[:, :STATS_COLUMNS].contiguous()
    out = torch.zeros(count, STATS_COLUMNS, dtype=torch.float32, device=device)
    out[:, :stats.shape[1]] = stats
    return out


def _mm32(a, b):
    """a @ b with an fp32 result (fp32 accumulation, one rounding of 16-bit operands' products)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=) (added in 2.8)
            pass
    return a.float() @ b.float()


def _round_up(x, to=16):
    return (x + to - 1) // to * to


def infonce_bwd(q, k, bank, scale, q_labels, k_labels, exclude_self, in_batch_negatives, pml, symmetric,
                row_stats, col_stats, g_row, g_col, needs_dq=True, needs_dk=True, needs_dbank=True,
                deterministic=None, external_stats=False):
    """Fused InfoNCE backward: (dq or None, dk or None, dbank or None, dscale 0-d float32).

    ``external_stats`` (stats merged over more keys than ``k``, a ring block) changes nothing here: this kernel
    always takes the softmax against the stats it is given, never renormalising them."""
    det = _deterministic(deterministic)
    dtypes = (q.dtype, k.dtype, None if bank is None else bank.dtype)
    c = _prepare(q, k, bank, scale, q_labels, k_labels)
    n, m, d, kb, dev = c.n, c.m, c.d, c.kb, c.q.device
    needs_dbank = bool(needs_dbank) and kb > 0
    modes = _modes(c, exclude_self, in_batch_negatives, pml, symmetric)
    bn, bm = c.cfg.block_n, c.cfg.block_m
    need_coef = bool(pml) and row_stats.shape[1] < STATS_COLUMNS  # contract-only stats: compute c_i here
    row_stats = _full_stats(row_stats, n, dev)
    g_row = g_row.to(device=dev, dtype=torch.float32).contiguous()
    if symmetric:
        col_stats = _full_stats(col_stats, m, dev)
        g_col = g_col.to(device=dev, dtype=torch.float32).contiguous()
    else:
        col_stats, g_col = row_stats, g_row  # unused
    t_in, t_bank = triton.cdiv(m, bm), triton.cdiv(kb, bm)
    store_in, store_bank = bool(needs_dq or needs_dk), bool(needs_dq or needs_dbank)
    m_off = _round_up(m) if kb else m
    width = (m_off + _round_up(kb)) if kb else _round_up(m)
    itemsize = c.q.element_size()
    rows = _chunk_rows(n, bn, width * itemsize, 0, workspace_budget(dev, det))
    slab = torch.empty(rows, width, dtype=c.q.dtype, device=dev) if (store_in or store_bank) else None
    dq32 = torch.empty(n, d, dtype=torch.float32, device=dev) if needs_dq else None
    dk32 = dbank32 = None
    dscale = []
    for r0 in range(0, n, rows):
        rc = min(rows, n - r0)
        rb = triton.cdiv(rc, bn)
        qc = c.q[r0:r0 + rc]
        if need_coef:
            row_stats[r0:r0 + rc, 3] = _pml_pass(c, qc, r0, rc, row_stats, modes)[1]
        s_in = _splits(rb, t_in, dev)
        s_bank = _splits(rb, t_bank, dev) if kb else 0
        part = torch.empty(rb * (s_in + s_bank), dtype=torch.float32, device=dev)
        ds_ptr = slab if slab is not None else part
        stride = width
        _infonce_bwd_kernel[(rb, s_in)](qc, c.k, c.scale, c.ql, c.kl, row_stats, col_stats, g_row, g_col, ds_ptr,
                                        stride, part, rc, r0, m, d, triton.cdiv(t_in, s_in), **modes, IS_BANK=False,
                                        STORE_DS=store_in, **c.const)
        if kb:
            ds_bank = slab[:, m_off:] if slab is not None else part
            _infonce_bwd_kernel[(rb, s_bank)](qc, c.bank, c.scale, c.ql, c.kl, row_stats, col_stats, g_row, g_col,
                                              ds_bank, stride, part[rb * s_in:], rc, r0, kb, d,
                                              triton.cdiv(t_bank, s_bank), **_BANK_MODES, PML=bool(pml),
                                              IS_BANK=True, STORE_DS=store_bank, **c.const)
        dscale.append(part.sum())
        if slab is None:
            continue
        ds_in = slab[:rc, :m]
        ds_bk = slab[:rc, m_off:m_off + kb] if kb else None
        if needs_dq:
            dq = _mm32(ds_in, c.k)
            if kb:
                dq += _mm32(ds_bk, c.bank)
            dq32[r0:r0 + rc] = dq
        if needs_dk:
            part_dk = _mm32(ds_in.t(), qc)
            dk32 = part_dk if dk32 is None else dk32.add_(part_dk)
        if needs_dbank:
            part_db = _mm32(ds_bk.t(), qc)
            dbank32 = part_db if dbank32 is None else dbank32.add_(part_db)
    # Non-finite rule (2026-12-02, issue 9 item 1): a NaN logit makes the reference's dS NaN on every *valid*
    # entry of its row (column), even where the kernel writes an exact 0 (a row without positives, g = 0); the
    # products then carry it to the whole dq row and to the dk / dbank rows of those valid entries.  Poisoned
    # here on the O(N D) outputs, not on the dS slab (an extra pass over it would cost ~10% at N = 65536).
    bad_any = None
    if needs_dq or needs_dk or needs_dbank:
        bad_row = torch.isnan(row_stats[:n, 0])
        bad_col = torch.isnan(col_stats[:m, 0]) if symmetric else None
        nan = torch.tensor(float("nan"), device=dev)
        bad_any = bad_row.any() if bad_col is None else bad_row.any() | bad_col.any()
        if needs_dq:
            dq32 = torch.where(bad_row[:, None] if bad_col is None else bad_row[:, None] | bad_col.any(), nan, dq32)
        if needs_dk:
            hit = _valid_columns_of(bad_row, c, m, exclude_self, in_batch_negatives, dev)
            hit = hit if bad_col is None else hit | bad_col | bad_row.any()
            dk32 = torch.where(hit[:, None], nan, dk32)
        if needs_dbank:
            dbank32 = torch.where(bad_row.any(), nan, dbank32)
    dq = dq32.to(dtypes[0]) if needs_dq else None
    dk = dk32.to(dtypes[1]) if needs_dk else None
    dbank_out = dbank32.to(dtypes[2]) if needs_dbank else None
    dscale = torch.stack(dscale).sum()
    return dq, dk, dbank_out, dscale if bad_any is None else torch.where(bad_any, nan, dscale)


def _valid_columns_of(bad_row, c, m, exclude_self, in_batch_negatives, dev):
    """(m,) bool: key j is a valid entry of some row in ``bad_row`` (the non-finite rule above)."""
    n = bad_row.shape[0]
    own = torch.zeros(m, dtype=torch.bool, device=dev)
    r = min(n, m)
    own[:r] = bad_row[:r]                                   # key j = i: row i's own column
    if in_batch_negatives:                                  # every key is in the row's set (less itself)
        others = bad_row.sum() - (own.long() if exclude_self else 0)
        return torch.broadcast_to(others > 0, (m,))
    if not c.has_labels:                                    # diagonal positives only
        return own
    # positives only: the keys that share a bad row's label (a rare path: torch.unique syncs)
    _, inv = torch.unique(torch.cat([c.ql[:n].reshape(-1), c.kl[:m].reshape(-1)]), return_inverse=True)
    cls_bad = torch.zeros(n + m, dtype=torch.long, device=dev).index_add_(0, inv[:n], bad_row.long())
    return (cls_bad[inv[n:]] - (own.long() if exclude_self else 0)) > 0


def siglip_fwd(q, k, scale, bias):
    """Fused SigLIP forward: row_loss (N,) float32 (the loss is row_loss.sum() / N)."""
    c = _prepare(q, k, None, scale)
    n, m, d, dev = c.n, c.m, c.d, c.q.device
    bn, bm = c.cfg.block_n, c.cfg.block_m
    rb = triton.cdiv(n, bn)
    t = triton.cdiv(m, bm)
    splits = _splits(rb, t, dev)
    out = torch.empty(splits, n, dtype=torch.float32, device=dev)
    _siglip_fwd_kernel[(rb, splits)](c.q, c.k, c.scale, _scalar(bias, c.q), out, n, 0, m, d, triton.cdiv(t, splits),
                                     **c.const)
    return out.sum(0)


def siglip_bwd(q, k, scale, bias, g_row, needs_dq=True, needs_dk=True, deterministic=None):
    """Fused SigLIP backward: (dq or None, dk or None, dscale 0-d float32, dbias 0-d float32)."""
    det = _deterministic(deterministic)
    dtypes = (q.dtype, k.dtype)
    c = _prepare(q, k, None, scale)
    n, m, d, dev = c.n, c.m, c.d, c.q.device
    bn, bm = c.cfg.block_n, c.cfg.block_m
    b = _scalar(bias, c.q)
    g_row = g_row.to(device=dev, dtype=torch.float32).contiguous()
    t = triton.cdiv(m, bm)
    store = bool(needs_dq or needs_dk)
    width = _round_up(m)
    rows = _chunk_rows(n, bn, width * c.q.element_size(), 0, workspace_budget(dev, det))
    slab = torch.empty(rows, width, dtype=c.q.dtype, device=dev) if store else None
    dq32 = torch.empty(n, d, dtype=torch.float32, device=dev) if needs_dq else None
    dk32 = None
    red = []
    for r0 in range(0, n, rows):
        rc = min(rows, n - r0)
        rb = triton.cdiv(rc, bn)
        qc = c.q[r0:r0 + rc]
        splits = _splits(rb, t, dev)
        part = torch.empty(2, rb * splits, dtype=torch.float32, device=dev)
        _siglip_bwd_kernel[(rb, splits)](qc, c.k, c.scale, b, g_row, slab if store else part, width, part, rc, r0, m,
                                         d, triton.cdiv(t, splits), STORE_DS=store, **c.const)
        red.append(part.sum(1))
        if not store:
            continue
        ds = slab[:rc, :m]
        if needs_dq:
            dq32[r0:r0 + rc] = _mm32(ds, c.k)
        if needs_dk:
            part_dk = _mm32(ds.t(), qc)
            dk32 = part_dk if dk32 is None else dk32.add_(part_dk)
    dscale = torch.stack([r[0] for r in red]).sum()   # separate tensors: custom-op outputs must not alias
    dbias = torch.stack([r[1] for r in red]).sum()
    return dq32.to(dtypes[0]) if needs_dq else None, dk32.to(dtypes[1]) if needs_dk else None, dscale, dbias


# ----------------------------------------------------------------------------------------------- AOT list
# Mode flags of the launches the public API makes for the benchmark cases (benches/cases.py):
# (HAS_LABELS, EXCLUDE_SELF, IN_BATCH_NEG, PML, SYMMETRIC)
LAUNCH_MODES = {
    "clip": (False, False, True, False, True),            # clip_loss
    "diagonal": (False, False, True, False, False),       # info_nce/diagonal
    "moco": (False, False, False, False, False),          # info_nce/bank (+ the bank launches)
    "supcon_self": (True, True, True, False, False),      # info_nce/supcon, nt_xent
    "pml_self": (True, True, True, True, False),          # info_nce/pml (+ the pml pass)
}
_BANK_CASES = ("moco",)
# the benchmarks run bfloat16; clip (and SigLIP) also float16 / float32 (the CUDA tests)
_ALL_DTYPE_MODES = ("clip",)
_MOD = __name__
_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _sig(fn, types, constexprs):
    return {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}


def _tile_aot(fn, dt, cfg: TileConfig, arch, cx, tma=True):
    f32 = {p: "*fp32" for p in ("scale_ptr", "bias_ptr", "row_rec_ptr", "col_rec_ptr", "row_stats_ptr",
                                "col_stats_ptr", "g_row_ptr", "g_col_ptr", "dscale_ptr", "out_ptr", "red_ptr")}
    types = {"q_ptr": _PTR[dt], "k_ptr": _PTR[dt], "ds_ptr": _PTR[dt], "ql_ptr": "*i64", "kl_ptr": "*i64",
             "ds_stride": "i32", **f32}
    const = dict(cx, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, TMA=tma,
                 FP32_DOT=dt == "fp32", UPCAST=False)
    return AotConfig(f"{_MOD}:{fn.__name__}", _sig(fn, types, const), const, cfg.num_warps, cfg.num_stages,
                     divisible_by_16=("D", "ds_stride"), archs=(arch,))


def _aot_configs():
    out = []
    for arch, prec in sorted({(a, p) for a, p, _ in TILE_CONFIGS}):
        tma = (arch, prec, True) in TILE_CONFIGS
        cfg = TILE_CONFIGS[(arch, prec, tma)]
        ptr_cfg = TILE_CONFIGS[(arch, prec, False)]
        for dt in (("fp32",) if prec == "fp32" else ("bf16", "fp16")):
            modes = [m for m in LAUNCH_MODES if dt == "bf16" or m in _ALL_DTYPE_MODES]
            fwd, bwd, pml_pass = set(), set(), set()
            for name in modes:
                lab, ex, ibn, pml, sym = LAUNCH_MODES[name]
                mode = dict(HAS_LABELS=lab, EXCLUDE_SELF=ex, IN_BATCH_NEG=ibn, PML=pml, SYMMETRIC=sym)
                fwd.add(tuple(sorted(dict(mode, IS_BANK=False).items())))
                bwd.add(tuple(sorted(dict(mode, IS_BANK=False, STORE_DS=True).items())))
                if pml:
                    pml_pass.add(tuple(sorted(dict(HAS_LABELS=lab, EXCLUDE_SELF=ex, IN_BATCH_NEG=ibn).items())))
                if name in _BANK_CASES:   # the bank launches of these cases
                    fwd.add(tuple(sorted(dict(_BANK_MODES, PML=False, IS_BANK=True).items())))
                    bwd.add(tuple(sorted(dict(_BANK_MODES, PML=pml, IS_BANK=True, STORE_DS=True).items())))
            for cx in sorted(fwd):
                out.append(_tile_aot(_infonce_fwd_kernel, dt, cfg, arch, dict(cx), tma=tma))
            for cx in sorted(bwd):
                out.append(_tile_aot(_infonce_bwd_kernel, dt, cfg, arch, dict(cx), tma=tma))
            for cx in sorted(pml_pass):
                out.append(_tile_aot(_infonce_pml_kernel, dt, cfg, arch, dict(cx), tma=tma))
            out.append(_tile_aot(_siglip_fwd_kernel, dt, cfg, arch, {}, tma=tma))
            out.append(_tile_aot(_siglip_bwd_kernel, dt, cfg, arch, dict(STORE_DS=True), tma=tma))
            if tma and dt in ("bf16", "fp32"):  # rows not 16-byte aligned (odd D): the pointer tiles (CUDA tests)
                cx = dict(zip(("HAS_LABELS", "EXCLUDE_SELF", "IN_BATCH_NEG", "PML", "SYMMETRIC"), LAUNCH_MODES["clip"]))
                out.append(_tile_aot(_infonce_fwd_kernel, dt, ptr_cfg, arch, dict(cx, IS_BANK=False), tma=False))
                out.append(_tile_aot(_infonce_bwd_kernel, dt, ptr_cfg, arch, dict(cx, IS_BANK=False, STORE_DS=True),
                                     tma=False))
    for pml, final in ((False, True), (True, True), (False, False)):
        out.append(AotConfig(f"{_MOD}:_infonce_merge_kernel",
                             {"rec_ptr": "*fp32", "n_parts": "i32", "parts_stride": "i32", "count": "i32",
                              "loss_ptr": "*fp32", "stats_ptr": "*fp32", "PML": "constexpr", "FINAL": "constexpr",
                              "BLOCK_C": "constexpr"},
                             {"PML": pml, "FINAL": final, "BLOCK_C": MERGE_BLOCK}, 4, 1))
    return out


AOT_CONFIGS = _aot_configs()


# ----------------------------------------------------------------------------------------------- roofline model
ROOFLINE_CASES = {"clip_n65536_d512_bf16": ("clip", 65536, 512), "siglip_n65536_d512_bf16": ("siglip", 65536, 512)}


def roofline_model(case: str) -> list:
    """The launches of a headline case on an H200 (sm_90, 132 SMs, workspace cap WORKSPACE_CAP_BYTES) with their FLOP
    and byte counts from the tiling, for ``python -m contrastgen.kernels.roofline``.  HBM bytes count each input once
    per pass (the programs of a wave share the Q / K tiles through L2) plus every record / slab byte; L2 bytes count
    every tile load ((BLOCK_N + BLOCK_M) D itemsize per tile).  ``tiles``: the full (fast-path) tiles, which carry
    ~all the work (the diagonal / edge tiles take the masked path in sub-tiles)."""
    if case not in ROOFLINE_CASES:
        raise ValueError(f"roofline_model: unknown case {case!r} (known: {sorted(ROOFLINE_CASES)})")
    kind, n, d = ROOFLINE_CASES[case]
    m, esz, arch, sms = n, 2, 90, 132
    cfg = TILE_CONFIGS[(arch, "16bit", _tma_ok(d, esz))]
    bn, bm, bd = cfg.block_n, cfg.block_m, cfg.block_d
    g = 2.0 * n * m * d
    budget = WORKSPACE_CAP_BYTES
    t = triton.cdiv(m, bm)
    rows_out = []

    def add(kernel, aot, ctas, flops, hbm, l2, note, **extra):
        rows_out.append(dict(kernel=kernel, aot_config=aot, ctas=int(ctas), flops=float(flops), hbm_bytes=float(hbm),
                             l2_bytes=float(l2), note=note, **extra))

    inputs = (n + m) * d * esz
    if kind == "clip":
        mode = dict(zip(("HAS_LABELS", "EXCLUDE_SELF", "IN_BATCH_NEG", "PML", "SYMMETRIC"), LAUNCH_MODES["clip"]))
        per_row = 4 * NF * min(t, PROGRAMS_PER_SM * sms) + 4 * NF * m / bn
        rows = _chunk_rows(n, bn, per_row, 4 * NF * 2 * m, budget)
        chunks = triton.cdiv(n, rows)
        rb = triton.cdiv(min(rows, n), bn)
        splits = _splits(rb, t, sms=sms)
        tiles = triton.cdiv(n, bn) * t
        diag = triton.cdiv(n, bn)
        col_rec = 4 * NF * (triton.cdiv(n, bn) + chunks) * m
        row_rec = 4 * NF * splits * n
        add("_infonce_fwd_kernel", _tile_aot(_infonce_fwd_kernel, "bf16", cfg, arch, dict(mode, IS_BANK=False)),
            chunks * rb * splits, g, inputs + col_rec + row_rec, tiles * (bn + bm) * d * esz + col_rec + row_rec,
            f"{chunks} chunk(s) of {rows} rows, {rb} x {splits} programs, {tiles} tiles of {bn}x{bm}x{bd} "
            f"({diag} diagonal ones in sub-tiles); row + column records {(col_rec + row_rec) / 1e6:.0f} MB",
            tiles=tiles - diag, inner_trips=d / bd, phase="fwd")
        merge_rows = [c for c in AOT_CONFIGS if c.kernel_path.endswith("_infonce_merge_kernel")]
        add("_infonce_merge_kernel (rows)", merge_rows[0], chunks * triton.cdiv(rows, MERGE_BLOCK), 0,
            row_rec + 20 * n, row_rec + 20 * n, "merge the row records of the splits", phase="fwd")
        add("_infonce_merge_kernel (cols)", merge_rows[0], chunks * triton.cdiv(m, MERGE_BLOCK), 0,
            col_rec + 20 * m, col_rec + 20 * m, "merge the column records of the row blocks", phase="fwd")
        slab_rows = _chunk_rows(n, bn, _round_up(m) * esz, 0, budget)
        bchunks = triton.cdiv(n, slab_rows)
        slab = n * m * esz
        add("_infonce_bwd_kernel", _tile_aot(_infonce_bwd_kernel, "bf16", cfg, arch,
                                             dict(mode, IS_BANK=False, STORE_DS=True)),
            bchunks * triton.cdiv(min(slab_rows, n), bn) * splits, g, inputs + slab, tiles * (bn + bm) * d * esz + slab,
            f"{bchunks} chunk(s) of {slab_rows} rows: dS slab {slab / 1e9:.1f} GB written (bf16)",
            tiles=tiles - diag, inner_trips=d / bd, phase="bwd")
        add("dQ = dS K (torch.mm, cuBLAS)", None, 0, g, slab + m * d * esz + n * d * 4, slab + m * d * esz,
            "fp32 output, one read of the slab", phase="bwd")
        add("dK = dS^T Q (torch.mm, cuBLAS)", None, 0, g, slab + n * d * esz + m * d * 4, slab + n * d * esz,
            "fp32 output, one read of the slab", phase="bwd")
        add("casts dq, dk -> bf16", None, 0, 0, (n + m) * d * (4 + esz), (n + m) * d * (4 + esz), "", phase="bwd")
    else:
        rb = triton.cdiv(n, bn)
        splits = _splits(rb, t, sms=sms)
        tiles = rb * t
        add("_siglip_fwd_kernel", _tile_aot(_siglip_fwd_kernel, "bf16", cfg, arch, {}), rb * splits, g,
            inputs + 4 * splits * n, tiles * (bn + bm) * d * esz, f"{rb} x {splits} programs, {tiles} tiles",
            tiles=tiles - rb, inner_trips=d / bd, phase="fwd")
        slab_rows = _chunk_rows(n, bn, _round_up(m) * esz, 0, budget)
        bchunks = triton.cdiv(n, slab_rows)
        slab = n * m * esz
        add("_siglip_bwd_kernel", _tile_aot(_siglip_bwd_kernel, "bf16", cfg, arch, dict(STORE_DS=True)),
            bchunks * triton.cdiv(min(slab_rows, n), bn) * splits, g, inputs + slab,
            tiles * (bn + bm) * d * esz + slab, f"{bchunks} chunk(s): dZ slab {slab / 1e9:.1f} GB written (bf16)",
            tiles=tiles - rb, inner_trips=d / bd, phase="bwd")
        add("dQ = dZ K (torch.mm, cuBLAS)", None, 0, g, slab + m * d * esz + n * d * 4, slab + m * d * esz, "",
            phase="bwd")
        add("dK = dZ^T Q (torch.mm, cuBLAS)", None, 0, g, slab + n * d * esz + m * d * 4, slab + n * d * esz, "",
            phase="bwd")
        add("casts dq, dk -> bf16", None, 0, 0, (n + m) * d * (4 + esz), (n + m) * d * (4 + esz), "", phase="bwd")
    return rows_out
