"""The benchmark registry: op x shape x dtype x provider x mode.

Each :class:`OpSpec` says how to build inputs for a shape, which public function and reference it
times, its shapes per regime (``quick`` = CPU smoke run, ``cpu``, ``cuda``), its FLOP / byte counts,
an estimate of the dense reference's memory (to skip shapes that cannot fit), and its peer
implementations.  Providers:

* ``reference``: the public API with ``backend="torch"`` (the dense PyTorch reference).
* ``compile``:   ``torch.compile`` of the reference function in ``contrastgen.reference``.
* ``cpp`` / ``triton``: the public API with that backend; skipped (with the dispatcher's reason)
  until a fused implementation registers for the op, so new kernels are picked up automatically.
* peers, imported lazily: ``open_clip`` (OpenCLIP ``ClipLoss`` / ``SigLipLoss``), ``pml``
  (pytorch-metric-learning ``NTXentLoss``), ``keops`` (pykeops LazyTensor log-sum-exp reductions),
  ``inf_cl`` (Inf-CL ``cal_inf_loss``, CUDA only).

FLOP convention (the same count for every provider, so TFLOP/s compare like for like): with
``G = 2 N M D`` one product of the logits, an O(N)-memory InfoNCE/CLIP kernel does fwd ``G``, bwd ``3G``
(recompute S, dQ, dK), fwd+bwd ``4G``; SigLIP (elementwise gradient, computable with the forward):
fwd ``G``, bwd ``2G``, fwd+bwd ``3G``; Gram-type losses (dispersive, uniformity, with ``G = 2 N^2 M``):
fwd ``G``, bwd ``2G`` (recompute the Gram, one product for dZ), fwd+bwd ``3G``.  Bytes (huge-dim
dispersive only, the minimum traffic): fwd reads Z once, bwd reads Z and writes dZ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

PROVIDERS = ("reference", "compile", "cpp", "triton", "open_clip", "pml", "keops", "inf_cl")
FUSED = ("cpp", "triton")
DENSE = ("reference", "compile", "open_clip", "pml")    # materialise N x M logits: skipped where they cannot fit
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class Skip(Exception):
    """A provider that cannot run this case (not installed, wrong device, no implementation)."""


# Bytes a case may use; set by the runner (70% of available RAM on CPU, where an OOM kills the
# process; 2x free memory on CUDA, where an OOM is caught).  Peers with a known blow-up check it.
MEMORY_LIMIT = float("inf")


def _check_memory(who, need):
    if need > MEMORY_LIMIT:
        raise Skip(f"{who} would need ~{need / 2**30:.0f} GiB, more than the {MEMORY_LIMIT / 2**30:.0f} GiB limit")


@dataclass
class Inputs:
    args: tuple
    kwargs: dict
    grads: list            # the tensors that receive gradients


@dataclass
class OpSpec:
    name: str                                   # "family" or "family/variant"
    api: str                                    # public function in contrastgen
    core: str                                   # dispatcher op name for cpp / triton
    make: Callable[[dict, torch.dtype, str], Inputs]
    ref_fn: Callable                            # contrastgen.reference function (for compile)
    shapes: Dict[str, List[dict]]
    check: dict                                 # small shape for the correctness check
    x: str                                      # x-axis key of the plot
    flops: Optional[Callable[[dict, str], float]] = None
    traffic: Optional[Callable[[dict, str, int], float]] = None
    dense_bytes: Callable[[dict], float] = lambda s: 0.0
    peers: Dict[str, Callable] = field(default_factory=dict)
    ref64: Optional[Callable] = None            # chunked float64 (loss, grads) for checks at large shapes

    @property
    def family(self) -> str:
        return self.name.split("/")[0]


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _mode(mode: str, fwd: float, bwd: float) -> float:
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _randn(shape, dtype, device, *, normalize=False, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float32)
    if normalize:
        x = F.normalize(x, dim=-1)
    return x.to(device=device, dtype=dtype).requires_grad_(grad)


# --------------------------------------------------------------------------- peers (lazy imports)
def _require_float(dtype, who):
    if dtype not in (torch.float32, torch.float64):
        raise Skip(f"{who} supports float32/float64 only, not {str(dtype).replace('torch.', '')}")


def _lazy(module: str, pip_name: str):
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising something else at import
        raise Skip(f"{pip_name} not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                   "pip install 'contrastgen[bench]'")


def _keops(dtype):
    _require_float(dtype, "KeOps")
    mod = _lazy("pykeops.torch", "pykeops")
    import pykeops
    pykeops.set_verbose(False)
    return mod.LazyTensor


def _inf_cl(device):
    if device != "cuda":
        raise Skip("Inf-CL runs only on CUDA tensors")
    return _lazy("inf_cl", "inf-cl")


def _inf_cl_head_dim(d):
    for h in (256, 128, 64, 32, 16):
        if d % h == 0:
            return h
    raise Skip(f"Inf-CL needs D divisible by 16, got D={d}")


def peer_open_clip_clip(shape, dtype, device):
    loss = _lazy("open_clip.loss", "open-clip-torch").ClipLoss()
    return lambda inp: loss(inp.args[0], inp.args[1], inp.args[2])


def peer_open_clip_siglip(shape, dtype, device):
    loss = _lazy("open_clip.loss", "open-clip-torch").SigLipLoss()
    return lambda inp: loss(inp.args[0], inp.args[1], inp.args[2], inp.args[3])


def peer_inf_cl_clip(shape, dtype, device):
    mod = _inf_cl(device)
    h = _inf_cl_head_dim(shape["D"])

    def fn(inp):
        i, t, s = inp.args[0], inp.args[1], inp.args[2]
        return 0.5 * (mod.cal_inf_loss(i, t, scale=s, head_dim=h) + mod.cal_inf_loss(t, i, scale=s, head_dim=h))
    return fn


def peer_inf_cl_infonce(shape, dtype, device):
    mod = _inf_cl(device)
    h = _inf_cl_head_dim(shape["D"])

    def fn(inp):
        q, k = inp.args[0], inp.args[1]
        scale = torch.tensor(1.0 / inp.kwargs["temperature"], device=q.device)
        return mod.cal_inf_loss(q, k, scale=scale, head_dim=h)
    return fn


def _pml_bytes(n_pos_pairs, n_neg_pairs):
    """PML's NTXentLoss builds (positive pairs x negative pairs) matrices (mask, masked logits, their
    gradients): about 24 bytes per element, cubic in N."""
    return 24.0 * n_pos_pairs * n_neg_pairs


def peer_pml_ntxent_views(shape, dtype, device):
    n2 = 2 * shape["N"]
    _check_memory("pytorch-metric-learning NTXentLoss", _pml_bytes(n2, n2 * (n2 - 2)))
    losses = _lazy("pytorch_metric_learning.losses", "pytorch-metric-learning")

    def fn(inp):
        z1, z2 = inp.args
        n = z1.shape[0]
        labels = torch.arange(n, device=z1.device).repeat(2)
        return losses.NTXentLoss(temperature=inp.kwargs["temperature"])(torch.cat([z1, z2]), labels)
    return fn


def peer_pml_ntxent_labels(shape, dtype, device):
    """PML's NT-Xent on labelled embeddings (self excluded).  PML uses cosine similarity; the inputs
    are built L2-normalised so that it equals the dot-product loss of ``info_nce(positives="pml")``."""
    n = shape["N"]
    _check_memory("pytorch-metric-learning NTXentLoss", _pml_bytes(3 * n, n * (n - 4)))   # 4 views per class
    losses = _lazy("pytorch_metric_learning.losses", "pytorch-metric-learning")

    def fn(inp):
        return losses.NTXentLoss(temperature=inp.kwargs["temperature"])(inp.args[0], inp.kwargs["labels"])
    return fn


def peer_keops_clip(shape, dtype, device):
    LazyTensor = _keops(dtype)

    def fn(inp):
        image, text, scale = inp.args[0], inp.args[1], float(inp.args[2])
        s = (LazyTensor(image[:, None, :]) | LazyTensor(text[None, :, :])) * scale   # (N, N) symbolic
        row = s.logsumexp(dim=1).view(-1)
        col = s.logsumexp(dim=0).view(-1)
        diag = scale * (image * text).sum(-1)
        return 0.5 * (row.mean() + col.mean()) - diag.mean()
    return fn


def peer_keops_uniformity(shape, dtype, device):
    LazyTensor = _keops(dtype)

    def fn(inp):
        x, t = inp.args[0], inp.kwargs["t"]
        n = x.shape[0]
        idx = torch.arange(n, dtype=x.dtype, device=x.device)
        off = ((LazyTensor(idx[:, None, None]) - LazyTensor(idx[None, :, None])) ** 2).sign()  # 0 on the diagonal
        d = ((LazyTensor(x[:, None, :]) - LazyTensor(x[None, :, :])) ** 2).sum(-1)
        lse = (-t * d + (off - 1.0) * 1e4).logsumexp(dim=1).view(-1)
        return torch.logsumexp(lse, 0) - math.log(n * (n - 1))
    return fn


def peer_keops_dispersive(shape, dtype, device):
    LazyTensor = _keops(dtype)

    def fn(inp):
        z, tau = inp.args[0], inp.kwargs["tau"]
        n, m = z.shape
        d = ((LazyTensor(z[:, None, :]) - LazyTensor(z[None, :, :])) ** 2).sum(-1)
        lse = (-d * (1.0 / (m * tau))).logsumexp(dim=1).view(-1)
        return torch.logsumexp(lse, 0) - 2.0 * math.log(n)
    return fn


# --------------------------------------------------------------------------- input builders
def make_info_nce(variant):
    def make(s, dtype, device):
        n, d = s["N"], s["D"]
        if variant == "diagonal":
            return Inputs((_randn((n, d), dtype, device, normalize=True, seed=1),
                           _randn((n, d), dtype, device, normalize=True, seed=2)),
                          {"temperature": 0.07}, [])
        if variant in ("supcon", "pml"):
            labels = (torch.arange(n) % max(1, n // 4)).to(device)      # 4 views per class
            q = _randn((n, d), dtype, device, normalize=True, seed=1)
            return Inputs((q,), {"temperature": 0.1, "labels": labels, "positives": variant}, [])
        if variant == "bank":
            q = _randn((n, d), dtype, device, normalize=True, seed=1)
            k = _randn((n, d), dtype, device, normalize=True, seed=2)
            bank = _randn((s["K"], d), dtype, device, normalize=True, grad=False, seed=3)
            return Inputs((q, k), {"temperature": 0.07, "negatives": bank}, [])
        raise ValueError(variant)
    return _with_grads(make)


def _with_grads(make):
    def wrapped(s, dtype, device):
        inp = make(s, dtype, device)
        inp.grads = [t for t in list(inp.args) + list(inp.kwargs.values())
                     if isinstance(t, torch.Tensor) and t.requires_grad]
        return inp
    return wrapped


@_with_grads
def make_clip(s, dtype, device):
    n, d = s["N"], s["D"]
    return Inputs((_randn((n, d), dtype, device, normalize=True, seed=1),
                   _randn((n, d), dtype, device, normalize=True, seed=2),
                   torch.tensor(1 / 0.07, device=device)), {}, [])


@_with_grads
def make_siglip(s, dtype, device):
    n, d = s["N"], s["D"]
    return Inputs((_randn((n, d), dtype, device, normalize=True, seed=1),
                   _randn((n, d), dtype, device, normalize=True, seed=2),
                   torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)), {}, [])


@_with_grads
def make_nt_xent(s, dtype, device):
    n, d = s["N"], s["D"]
    return Inputs((_randn((n, d), dtype, device, seed=1), _randn((n, d), dtype, device, seed=2)),
                  {"temperature": 0.5}, [])


@_with_grads
def make_dispersive(s, dtype, device):
    key = "B" if "B" in s else "N"
    return Inputs((_randn((s[key], s["M"]), dtype, device, seed=1),), {"variant": "infonce_l2", "tau": 0.5}, [])


@_with_grads
def make_uniformity(s, dtype, device):
    return Inputs((_randn((s["N"], s["D"]), dtype, device, normalize=True, seed=1),), {"t": 2.0}, [])


def make_attention_nce(s, dtype, device):
    b, h = s["B"], s["H"]
    g = torch.Generator().manual_seed(1)
    maps = torch.softmax(torch.randn(b, h, h, 77, generator=g), -1).to(device=device, dtype=dtype).requires_grad_(True)
    prev = torch.softmax(torch.randn(b, h, h, 77, generator=g), -1).to(device=device, dtype=dtype)
    return Inputs((maps, [[2, 3], [6, 7]]), {"prev_maps": prev, "temperature": 0.5}, [maps])


def make_attention_nce_pipeline(s, dtype, device):
    """The ConformPipeline's call: token softmax (official __call__ default), previous maps, two groups of two."""
    b, h = s["B"], s["H"]
    g = torch.Generator().manual_seed(2)
    maps = torch.softmax(torch.randn(b, h, h, 77, generator=g) * 3, -1).to(device=device, dtype=dtype).requires_grad_(True)
    prev = torch.softmax(torch.randn(b, h, h, 77, generator=g) * 3, -1).to(device=device, dtype=dtype)
    return Inputs((maps, [[2, 3], [6, 7]]), {"prev_maps": prev, "temperature": 0.5, "softmax_normalize": True}, [maps])


# --------------------------------------------------------------------------- FLOPs / bytes / dense memory
def _infonce_flops(s, mode):
    n, d = s["N"], s["D"]
    m = n + s.get("K", 0)
    g = 2.0 * n * m * d
    return _mode(mode, g, 3 * g)


def _ntxent_flops(s, mode):
    g = 2.0 * (2 * s["N"]) ** 2 * s["D"]
    return _mode(mode, g, 3 * g)


def _siglip_flops(s, mode):
    g = 2.0 * s["N"] ** 2 * s["D"]
    return _mode(mode, g, 2 * g)


def _gram_flops(s, mode):
    n = s.get("B", s.get("N"))
    g = 2.0 * n * n * s.get("M", s.get("D"))
    return _mode(mode, g, 2 * g)


def _dispersive_traffic(s, mode, itemsize):
    z = s["B"] * s["M"] * itemsize
    return _mode(mode, z, 2 * z)


def _nn_bytes(n, m, k=8):
    """A dense reference keeps a few N x M fp32 buffers alive (logits, softmax, masks, grads)."""
    return k * 4.0 * n * m


# --------------------------------------------------------------------------- PatchNCE cases (self-contained block)
# CUT: 5 layers x B*256 patches x C = 256 after the MLP head, per-image negatives, keys detached (the CUT default);
# SinCUT: all-minibatch negatives (one group of B*P patches); key_grads: detach_key=False; i2i: the guidance use of
# issue 14 (UNet decoder features of different channel counts, 256 shared patches, no MLP, keys detached).
# FLOPs (minimum work, every provider): with G = 2 groups n^2 sum_l C_l the product S = Q K^T of all layers,
# fwd G, bwd G (dQ = dS K), fwd+bwd 2G; with key gradients bwd 2G (+ dK = dS^T Q).  The fused kernels do exactly
# that without key gradients (the forward computes loss and dq, 2G; the backward scales dq); with key gradients
# the backward recomputes S once more (3G + 2G).
PATCH_I2I_CHANNELS = {"sd": [1280, 1280, 640, 320], "small": [320, 320, 160, 64]}


def _patch_channels(s):
    return PATCH_I2I_CHANNELS[s["C"]] if isinstance(s["C"], str) else [s["C"]] * s["L"]


def make_patch_nce(minibatch, key_grads=False):
    def make(s, dtype, device):
        b, p = s["B"], s["P"]
        chans = _patch_channels(s)
        qs = [_randn((b, p, c), dtype, device, normalize=True, seed=10 + i) for i, c in enumerate(chans)]
        ks = [_randn((b, p, c), dtype, device, normalize=True, grad=key_grads, seed=20 + i)
              for i, c in enumerate(chans)]
        return Inputs((qs, ks), {"temperature": 0.07, "all_negatives_from_minibatch": minibatch,
                                 "detach_key": not key_grads}, [])

    def with_list_grads(s, dtype, device):
        inp = make(s, dtype, device)
        inp.grads = list(inp.args[0]) + (list(inp.args[1]) if key_grads else [])
        return inp
    return with_list_grads


def _patch_groups(s):
    return (1, s["B"] * s["P"]) if s.get("minibatch") else (s["B"], s["P"])


def _patch_flops(key_grads=False):
    def flops(s, mode):
        groups, n = _patch_groups(s)
        g = 2.0 * groups * n * n * sum(_patch_channels(s))
        return _mode(mode, g, 2 * g if key_grads else g)
    return flops


def _patch_dense_bytes(s):
    """The dense reference keeps ~6 fp32 (groups n x n) buffers per layer alive for its backward (logits, the
    masked copy, the concatenated logits, log-softmax, and their gradients)."""
    groups, n = _patch_groups(s)
    return 24.0 * groups * n * n * len(_patch_channels(s))


def _patch_nce_specs(R) -> List[OpSpec]:
    def cut(bs):
        return [{"B": b, "P": 256, "C": 256, "L": 5} for b in bs]

    def sincut(bs, layers):
        return [{"B": b, "P": 256, "C": 256, "L": layers, "minibatch": 1} for b in bs]
    return [
        OpSpec("patch_nce", "patch_nce", "patch_nce", make_patch_nce(False), R.patch_nce_ref,
               {"quick": cut((1, 4)), "cpu": cut((1, 4, 16)), "cuda": cut((1, 4, 16, 32))},
               {"B": 2, "P": 40, "C": 24, "L": 2}, "B", _patch_flops(), None, _patch_dense_bytes),
        OpSpec("patch_nce/minibatch", "patch_nce", "patch_nce", make_patch_nce(True), R.patch_nce_ref,
               {"quick": sincut((4,), 1), "cpu": sincut((4, 16, 64), 1), "cuda": sincut((16, 64, 256), 5)},
               {"B": 2, "P": 40, "C": 24, "L": 2, "minibatch": 1}, "B", _patch_flops(), None, _patch_dense_bytes),
        OpSpec("patch_nce/key_grads", "patch_nce", "patch_nce", make_patch_nce(False, True), R.patch_nce_ref,
               {"quick": cut((1,)), "cpu": cut((1, 4)), "cuda": cut((1, 4, 16))},
               {"B": 2, "P": 40, "C": 24, "L": 2}, "B", _patch_flops(True), None, _patch_dense_bytes),
        OpSpec("patch_nce/i2i", "patch_nce", "patch_nce", make_patch_nce(False), R.patch_nce_ref,
               {"quick": [{"B": 1, "P": 256, "C": "small"}], "cpu": [{"B": 1, "P": 256, "C": "sd"}],
                "cuda": [{"B": b, "P": 256, "C": "sd"} for b in (1, 4)]},
               {"B": 1, "P": 40, "C": "small"}, "B", _patch_flops(), None, _patch_dense_bytes),
    ]


# --------------------------------------------------------------------------- chunked float64 references
# For the correctness check at the headline shapes (``--check-shape timed``): the dense float64 reference at
# N = 65,536 would hold several 32 GiB N x N matrices; these keep one (CHUNK, N) block at a time (2 GiB).
CHUNK = 4096


def _lse_rows(a, b, scale, chunk=CHUNK):
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for r0 in range(0, a.shape[0], chunk):
        out[r0:r0 + chunk] = torch.logsumexp(scale * (a[r0:r0 + chunk] @ b.T), 1)
    return out


def clip_ref64_chunked(inp, chunk=CHUNK):
    """OpenCLIP ClipLoss in float64 and its gradients w.r.t. image and text, in row blocks."""
    with torch.no_grad():
        im, tx, s = (a.detach().double() for a in inp.args[:3])
        n = im.shape[0]
        diag = s * (im * tx).sum(1)
        rlse, clse = _lse_rows(im, tx, s, chunk), _lse_rows(tx, im, s, chunk)
        loss = 0.5 * ((rlse - diag).mean() + (clse - diag).mean())
        d_im, d_tx = torch.empty_like(im), torch.zeros_like(tx)
        for r0 in range(0, n, chunk):
            logits = s * (im[r0:r0 + chunk] @ tx.T)
            a = torch.exp(logits - rlse[r0:r0 + chunk, None]) + torch.exp(logits - clse[None, :])
            d_im[r0:r0 + chunk] = a @ tx
            d_tx += a.T @ im[r0:r0 + chunk]
        c = s / (2 * n)
        return loss, [c * (d_im - 2 * tx), c * (d_tx - 2 * im)]


def siglip_ref64_chunked(inp, chunk=CHUNK):
    """OpenCLIP SigLipLoss in float64 and its gradients w.r.t. image and text, in row blocks."""
    with torch.no_grad():
        im, tx, s, b = (a.detach().double() for a in inp.args[:4])
        n = im.shape[0]
        loss = im.new_zeros(())
        d_im, d_tx = torch.empty_like(im), torch.zeros_like(tx)
        for r0 in range(0, n, chunk):
            logits = s * (im[r0:r0 + chunk] @ tx.T) + b
            y = -torch.ones_like(logits)
            idx = torch.arange(r0, min(n, r0 + chunk), device=im.device)
            y[idx - r0, idx] = 1.0
            loss -= F.logsigmoid(y * logits).sum()
            g = -(y * torch.sigmoid(-y * logits)) / n
            d_im[r0:r0 + chunk] = s * (g @ tx)
            d_tx += s * (g.T @ im[r0:r0 + chunk])
        return loss / n, [d_im, d_tx]


# --------------------------------------------------------------------------- the registry
def _specs() -> List[OpSpec]:
    from contrastgen import reference as R

    nd_cuda = [{"N": n, "D": d} for d in (256, 512, 1024) for n in (4096, 8192, 16384, 32768, 65536)] + \
              [{"N": 262144, "D": 256}]
    specs = [
        OpSpec("info_nce/diagonal", "info_nce", "infonce", make_info_nce("diagonal"), R.info_nce_ref,
               {"quick": [{"N": 256, "D": 64}, {"N": 1024, "D": 64}],
                "cpu": [{"N": n, "D": 256} for n in (1024, 4096, 8192)],
                "cuda": [{"N": n, "D": 512} for n in (4096, 16384, 65536, 262144)]},
               {"N": 67, "D": 24}, "N", _infonce_flops, None, lambda s: _nn_bytes(s["N"], s["N"]),
               {"inf_cl": peer_inf_cl_infonce}),
        OpSpec("info_nce/supcon", "info_nce", "infonce", make_info_nce("supcon"), R.info_nce_ref,
               {"quick": [{"N": 256, "D": 64}, {"N": 1024, "D": 64}],
                "cpu": [{"N": n, "D": 256} for n in (1024, 4096)],
                "cuda": [{"N": n, "D": 512} for n in (4096, 16384, 65536)]},
               {"N": 67, "D": 24}, "N", _infonce_flops, None, lambda s: _nn_bytes(s["N"], s["N"], 10)),
        OpSpec("info_nce/pml", "info_nce", "infonce", make_info_nce("pml"), R.info_nce_ref,
               {"quick": [{"N": 128, "D": 64}, {"N": 1024, "D": 64}],
                "cpu": [{"N": n, "D": 256} for n in (1024, 4096)],
                "cuda": [{"N": n, "D": 512} for n in (4096, 16384, 32768)]},
               {"N": 67, "D": 24}, "N", _infonce_flops, None, lambda s: _nn_bytes(s["N"], s["N"], 12),
               {"pml": peer_pml_ntxent_labels}),
        OpSpec("info_nce/bank", "info_nce", "infonce", make_info_nce("bank"), R.info_nce_ref,
               {"quick": [{"N": 128, "K": 1024, "D": 64}, {"N": 128, "K": 4096, "D": 64}],
                "cpu": [{"N": 256, "K": k, "D": 128} for k in (4096, 16384, 65536)],
                "cuda": [{"N": 4096, "K": k, "D": 256} for k in (16384, 65536, 262144)]},
               {"N": 33, "K": 70, "D": 24}, "K", _infonce_flops, None,
               lambda s: _nn_bytes(s["N"], s["N"] + s["K"])),
        OpSpec("clip_loss", "clip_loss", "infonce", make_clip, R.clip_loss_ref,
               {"quick": [{"N": 256, "D": 64}, {"N": 1024, "D": 64}],
                "cpu": [{"N": n, "D": d} for d in (128, 256) for n in (1024, 4096, 8192, 16384)],
                "cuda": nd_cuda},
               {"N": 67, "D": 24}, "N", _infonce_flops, None, lambda s: _nn_bytes(s["N"], s["N"]),
               {"open_clip": peer_open_clip_clip, "keops": peer_keops_clip, "inf_cl": peer_inf_cl_clip},
               ref64=clip_ref64_chunked),
        OpSpec("siglip_loss", "siglip_loss", "siglip", make_siglip, R.siglip_loss_ref,
               {"quick": [{"N": 256, "D": 64}, {"N": 1024, "D": 64}],
                "cpu": [{"N": n, "D": 256} for n in (1024, 4096, 8192)],
                "cuda": nd_cuda},
               {"N": 67, "D": 24}, "N", _siglip_flops, None, lambda s: _nn_bytes(s["N"], s["N"]),
               {"open_clip": peer_open_clip_siglip}, ref64=siglip_ref64_chunked),
        OpSpec("nt_xent", "nt_xent", "infonce", make_nt_xent, R.nt_xent_ref,
               {"quick": [{"N": 128, "D": 64}, {"N": 512, "D": 64}],
                "cpu": [{"N": n, "D": 128} for n in (512, 2048, 4096)],
                "cuda": [{"N": n, "D": 256} for n in (2048, 8192, 32768)]},
               {"N": 33, "D": 24}, "N", _ntxent_flops, None, lambda s: _nn_bytes(2 * s["N"], 2 * s["N"]),
               {"pml": peer_pml_ntxent_views}),
        OpSpec("dispersive_loss/huge_dim", "dispersive_loss", "dispersive", make_dispersive,
               R.dispersive_loss_ref,
               {"quick": [{"B": 64, "M": 65536}, {"B": 128, "M": 65536}],
                "cpu": [{"B": b, "M": 262144} for b in (64, 128, 256)],
                "cuda": [{"B": b, "M": 294912} for b in (32, 64, 128, 256)]},
               {"B": 9, "M": 1000}, "B", _gram_flops, _dispersive_traffic,
               lambda s: 6.0 * s["B"] * s["M"] * 4),
        OpSpec("dispersive_loss/many_samples", "dispersive_loss", "dispersive", make_dispersive,
               R.dispersive_loss_ref,
               {"quick": [{"N": 512, "M": 64}, {"N": 2048, "M": 64}],
                "cpu": [{"N": n, "M": 64} for n in (4096, 8192, 16384)],
                "cuda": [{"N": n, "M": 64} for n in (4096, 16384, 65536)]},
               {"N": 67, "M": 24}, "N", _gram_flops, None, lambda s: _nn_bytes(s["N"], s["N"]),
               {"keops": peer_keops_dispersive}),
        OpSpec("uniformity", "uniformity", "uniformity", make_uniformity, R.uniformity_ref,
               {"quick": [{"N": 512, "D": 64}, {"N": 2048, "D": 64}],
                "cpu": [{"N": n, "D": 64} for n in (4096, 8192, 16384)],
                "cuda": [{"N": n, "D": 128} for n in (4096, 16384, 65536)]},
               {"N": 67, "D": 24}, "N", _gram_flops, None, lambda s: _nn_bytes(s["N"], s["N"], 10),
               {"keops": peer_keops_uniformity}),
        OpSpec("attention_nce", "attention_nce", "attention_nce", make_attention_nce, R.attention_nce_ref,
               {"quick": [{"B": 1, "H": 16}, {"B": 4, "H": 16}],
                "cpu": [{"B": b, "H": 16} for b in (1, 8)],
                "cuda": [{"B": b, "H": 16} for b in (1, 8)]},
               {"B": 2, "H": 8}, "B"),
        OpSpec("attention_nce/pipeline", "attention_nce", "attention_nce", make_attention_nce_pipeline,
               R.attention_nce_ref,
               {"quick": [{"B": 1, "H": 16}, {"B": 8, "H": 16}],
                "cpu": [{"B": b, "H": 16} for b in (1, 8, 32)],
                "cuda": [{"B": b, "H": 16} for b in (1, 8, 64)]},
               {"B": 2, "H": 8}, "B"),
    ]
    specs[-1:-1] = _patch_nce_specs(R)      # PatchNCE's block (above), before attention_nce
    return specs


_SPECS: Optional[List[OpSpec]] = None


def all_specs() -> List[OpSpec]:
    global _SPECS
    if _SPECS is None:
        _SPECS = _specs()
    return _SPECS


def select_specs(ops: Optional[List[str]]) -> List[OpSpec]:
    """``ops``: names or family prefixes (``info_nce`` selects every ``info_nce/...`` variant)."""
    specs = all_specs()
    if not ops:
        return list(specs)
    out, unknown = [], []
    for want in ops:
        hit = [s for s in specs if s.name == want or s.family == want]
        if not hit:
            unknown.append(want)
        out += [s for s in hit if s not in out]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; known: {', '.join(s.name for s in specs)}")
    return out


# --------------------------------------------------------------------------- providers
_COMPILED: dict = {}


def build_provider(spec: OpSpec, provider: str, shape: dict, dtype: torch.dtype, device: str) -> Callable:
    """A callable ``fn(inputs) -> loss`` for this provider, or raise :class:`Skip`."""
    import contrastgen

    api = getattr(contrastgen, spec.api)
    if provider == "reference":
        return lambda inp: api(*inp.args, **inp.kwargs, backend="torch")
    if provider == "compile":
        key = (spec.name, str(dtype), device)
        if key not in _COMPILED:
            from torch import _dynamo
            cfg = _dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(64, getattr(cfg, name)))
            # "bwd" mode replays one backward graph (retain_graph=True); AOTAutograd's donated buffers forbid that.
            import torch._functorch.config as _fcfg
            if hasattr(_fcfg, "donated_buffer"):
                _fcfg.donated_buffer = False
            _COMPILED[key] = torch.compile(spec.ref_fn)
        fn = _COMPILED[key]
        return lambda inp: fn(*inp.args, **inp.kwargs)
    if provider in FUSED:
        if provider == "triton" and device != "cuda":
            raise Skip("Triton is timed on CUDA only (the CPU interpreter is for tests)")
        if provider == "cpp" and device != "cpu":
            raise Skip("the C++ backend runs on CPU tensors")
        from contrastgen.ops import resolve_backend
        try:
            resolve_backend(spec.core, provider, torch.device(device))
        except ValueError as e:
            raise Skip(str(e).split(": ", 1)[-1])
        return lambda inp: api(*inp.args, **inp.kwargs, backend=provider)
    factory = spec.peers.get(provider)
    if factory is None:
        raise Skip(f"no {provider} implementation of {spec.name}")
    return factory(shape, dtype, device)
