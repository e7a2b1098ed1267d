"""contrastgen.distributed on 2 and 4 gloo processes (CPU), against OpenCLIP's distributed losses run in the same
workers and against the single-process loss on the concatenated batch.

One ``torch.multiprocessing.spawn`` per world size runs every configuration (process start-up dominates the
cost) and saves what each rank saw; the tests below only compare.  float64 with ``backend="torch"`` (the exact
per-block reference) at 1e-9; the fused backends (C++, Triton under the interpreter) in float32 against the
project's accuracy rule (their error against float64 at most twice OpenCLIP's own float32 error).
"""
import datetime
import importlib.util
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import contrastgen as cg
import contrastgen.distributed as cd
from contrastgen.distributed import _blocks, _comm, _ring
from contrastgen.ops import available_backends

from _tolerance import assert_2x_torch

WORLDS = (2, 4)
N, D = 5, 7                        # local batch, feature dimension
UNEVEN = {2: (5, 3), 4: (5, 3, 4, 1)}
SCALE, BIAS = 3.0, -1.0            # CLIP-like logit scale; SigLIP gets its own bias below
SIG_SCALE, SIG_BIAS = 4.0, -2.0
CHUNKS = (1024, 2)                 # one chunk per block / 2-row chunks (3 uneven chunks of a 5-row block)
LL_GWG = [(True, True), (True, False), (False, True), (False, False)]
IMPLS = cd.DIST_IMPLS
TIMEOUT_S = 2.0                    # the short process-group timeout of the hang tests
TOL64 = dict(rtol=1e-9, atol=1e-9)
FUSED = tuple(b for b in ("cpp", "triton") if b in available_backends("infonce"))


def _openclip_loss_module():
    """open_clip/loss.py loaded on its own (importing the open_clip package costs ~3 s per process)."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    mspec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(world):
    g = torch.Generator().manual_seed(100 + world)
    m = sum(UNEVEN[world])
    return dict(img=torch.randn(world * N, D, dtype=torch.float64, generator=g),
                txt=torch.randn(world * N, D, dtype=torch.float64, generator=g),
                lab=torch.randint(0, 3, (world * N,), generator=g),
                img_u=torch.randn(m, D, dtype=torch.float64, generator=g),
                txt_u=torch.randn(m, D, dtype=torch.float64, generator=g),
                lab_u=torch.randint(0, 3, (m,), generator=g))


def _slices(sizes):
    offs = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(o, o + s) for o, s in zip(offs, sizes)]


# ------------------------------------------------------------------------------------------------ worker side
def _run(fn, x, y, scale, bias, dtype=None, record=True):
    """loss = fn(x, y, s, b); backward; -> (dict of loss and gradients, FutureWarning/DeprecationWarning texts)."""
    dtype = dtype or x.dtype
    x, y = x.to(dtype).clone().requires_grad_(), y.to(dtype).clone().requires_grad_()
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always" if record else "ignore")
        loss = fn(x, y, s, b)
        loss.backward()
    caught = [f"{w.category.__name__}: {w.message}" for w in rec if issubclass(w.category, (FutureWarning,
                                                                                           DeprecationWarning))]
    return dict(loss=loss.detach(), dx=x.grad, dy=y.grad, ds=s.grad, db=b.grad), caught


def _exc(e):
    return (type(e).__name__, str(e), isinstance(e, ValueError))


def _worker(rank, world, port, data, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a generous default timeout: a regression fails the run instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    oc = _openclip_loss_module()
    res, warned = {}, []
    sl = _slices([N] * world)[rank]
    usl = _slices(UNEVEN[world])[rank]
    img, txt, lab = data["img"][sl], data["txt"][sl], data["lab"][sl]
    img_u, txt_u, lab_u = data["img_u"][usl], data["txt_u"][usl], data["lab_u"][usl]

    def ours(key, fn, x, y, scale=SCALE, bias=BIAS, dtype=None):
        res[key], w = _run(fn, x, y, scale, bias, dtype)
        warned.extend(f"{key}: {m}" for m in w)

    def openclip(key, fn, x, y, scale=SCALE, bias=BIAS, dtype=None):
        res[key], _ = _run(fn, x, y, scale, bias, dtype, record=False)

    try:
        # --- CLIP, float64, exact reference blocks
        for ll, gwg in LL_GWG:
            openclip(("clip", "openclip", ll, gwg),
                     lambda i, t, s, b: oc.ClipLoss(local_loss=ll, gather_with_grad=gwg, rank=rank, world_size=world)(
                         i, t, s, b), img, txt)
            ours(("clip", "all_gather", ll, gwg),
                 lambda i, t, s, b: cd.clip_loss(i, t, s, b, mode="all_gather", local_loss=ll, gather_with_grad=gwg,
                                                 backend="torch"), img, txt)
        for chunk in CHUNKS:
            _ring.MAX_CHUNK_ROWS = chunk
            ours(("clip", "ring", chunk), lambda i, t, s, b: cd.clip_loss(i, t, s, b, mode="ring", backend="torch"),
                 img, txt)
            ours(("clip_u", "ring", chunk), lambda i, t, s, b: cd.clip_loss(i, t, s, b, mode="ring", backend="torch"),
                 img_u, txt_u)
        for ll in (True, False):
            ours(("clip_u", "all_gather", ll),
                 lambda i, t, s, b: cd.clip_loss(i, t, s, b, local_loss=ll, backend="torch"), img_u, txt_u)

        # --- SigLIP, float64
        for impl in IMPLS:
            openclip(("siglip", "openclip", impl),
                     lambda i, t, s, b: oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(i, t, s, b),
                     img, txt, SIG_SCALE, SIG_BIAS)
            for chunk in (CHUNKS if impl in ("shift", "bidir") else CHUNKS[:1]):
                _ring.MAX_CHUNK_ROWS = chunk
                for key, (x, y) in ((("siglip", impl, chunk), (img, txt)), (("siglip_u", impl, chunk), (img_u, txt_u))):
                    ours(key, lambda i, t, s, b: cd.siglip_loss(i, t, s, b, dist_impl=impl, backend="torch"), x, y,
                         SIG_SCALE, SIG_BIAS)

        # --- InfoNCE, float64 (temperature = 1 / s, so that s gets the gradient)
        for mode in cd.MODES:
            for chunk in (CHUNKS if mode == "ring" else CHUNKS[:1]):
                _ring.MAX_CHUNK_ROWS = chunk
                for use_labels in (False, True):
                    for key, (x, y, lb) in ((("infonce", mode, use_labels, chunk), (img, txt, lab)),
                                            (("infonce_u", mode, use_labels, chunk), (img_u, txt_u, lab_u))):
                        ours(key, lambda q, k, s, b: cd.info_nce(q, k, temperature=1.0 / s,
                                                                 labels=lb if use_labels else None, mode=mode,
                                                                 backend="torch"), x, y)

        # --- fused backends, float32 (2-row chunks: several fused calls per block)
        _ring.MAX_CHUNK_ROWS = 2
        f32 = torch.float32
        openclip(("clip_f", "openclip"), lambda i, t, s, b: oc.ClipLoss(local_loss=True, gather_with_grad=True,
                                                                         rank=rank, world_size=world)(i, t, s, b),
                 img, txt, dtype=f32)
        openclip(("siglip_f", "openclip"), lambda i, t, s, b: oc.SigLipLoss(rank=rank, world_size=world)(i, t, s, b),
                 img, txt, SIG_SCALE, SIG_BIAS, dtype=f32)
        for be in FUSED:
            _ring.MAX_CHUNK_ROWS = 2
            for mode in cd.MODES:
                ours(("clip_f", be, mode), lambda i, t, s, b: cd.clip_loss(i, t, s, b, mode=mode, backend=be),
                     img, txt, dtype=f32)
                ours(("infonce_f", be, mode), lambda q, k, s, b: cd.info_nce(q, k, temperature=1.0 / s, labels=lab,
                                                                             mode=mode, backend=be),
                     img, txt, dtype=f32)
            _ring.MAX_CHUNK_ROWS = CHUNKS[0]                # one chunk: the own block goes through the core
            for impl in ("shift", "bidir", "gather"):
                ours(("siglip_f", be, impl), lambda i, t, s, b: cd.siglip_loss(i, t, s, b, dist_impl=impl, backend=be),
                     img, txt, SIG_SCALE, SIG_BIAS, dtype=f32)
        _ring.MAX_CHUNK_ROWS = CHUNKS[0]

        # --- the ring overlaps: each round posts its messages, runs the kernel, then waits (event log, 2-row chunks)
        log, saved = [], (_ring.start_p2p, _blocks.InfoNCEBlocks.fwd, _blocks.InfoNCEBlocks.bwd)

        class LoggedWork:
            def __init__(self, w):
                self.w = w

            def wait(self):
                log.append("wait")
                return self.w.wait()

        def logged_p2p(ops, group):
            works = saved[0](ops, group)
            log.append(("post", len(works)))
            return [LoggedWork(w) for w in works]

        def logged(kind, fn):
            def run(*a, **k):
                log.append(kind)
                return fn(*a, **k)
            return run
        _ring.start_p2p, _ring.MAX_CHUNK_ROWS = logged_p2p, 2
        _blocks.InfoNCEBlocks.fwd, _blocks.InfoNCEBlocks.bwd = logged("fwd", saved[1]), logged("bwd", saved[2])
        try:
            _run(lambda i, t, s, b: cd.clip_loss(i, t, s, mode="ring", backend="torch"), img, txt, SCALE, BIAS)
        finally:
            _ring.start_p2p, _blocks.InfoNCEBlocks.fwd, _blocks.InfoNCEBlocks.bwd = saved
            _ring.MAX_CHUNK_ROWS = CHUNKS[0]
        res["overlap_log"] = log

        # --- the deprecated alias: one DeprecationWarning per process, same numbers as clip_loss
        res["alias_warnings"] = []
        for _ in range(2):
            res["alias"], w = _run(lambda i, t, s, b: cd.clip_loss_distributed(i, t, s, local_loss=True,
                                                                                backend="torch"), img, txt, SCALE, BIAS)
            res["alias_warnings"] += w

        # --- invalid inputs raise on every rank, promptly (on a group whose timeout turns a hang into a failure)
        guard = dist.new_group(timeout=datetime.timedelta(seconds=60))

        def attempt(key, fn):
            t0 = time.perf_counter()
            try:
                fn()
                res[key] = ("no error", "", False, time.perf_counter() - t0)
            except Exception as e:              # noqa: BLE001 - recorded and checked by the tests
                res[key] = _exc(e) + (time.perf_counter() - t0,)

        bad_txt = torch.randn(N, D + 1, dtype=torch.float64) if rank == 1 else txt
        attempt("err_local", lambda: cd.clip_loss(img, bad_txt, SCALE, mode="ring", group=guard, backend="torch"))
        wide = torch.randn(N, D + 1, dtype=torch.float64)
        attempt("err_dim", lambda: cd.clip_loss(wide if rank == 1 else img, wide if rank == 1 else txt, SCALE,
                                                mode="ring", group=guard, backend="torch"))
        attempt("err_mode", lambda: cd.clip_loss(img, txt, SCALE, mode="ring" if rank == 0 else "all_gather",
                                                 group=guard, backend="torch"))
        attempt("err_flags", lambda: cd.clip_loss(img, txt, SCALE, mode="ring", local_loss=False, group=guard,
                                                  backend="torch"))
        attempt("err_impl", lambda: cd.siglip_loss(img, txt, SIG_SCALE, SIG_BIAS,
                                                   dist_impl="shift" if rank else "gather", group=guard,
                                                   backend="torch"))
        attempt("err_dtype", lambda: cd.info_nce(img.float() if rank == 1 else img, txt.float() if rank == 1 else txt,
                                                 group=guard, backend="torch"))
        # the processes are still in step: one more good call works
        ours(("clip", "after_errors"), lambda i, t, s, b: cd.clip_loss(i, t, s, b, mode="ring", backend="torch"),
             img, txt)

        # --- a rank that never arrives / raises mid-ring: the others fail within the group's timeout
        short = dist.new_group(timeout=datetime.timedelta(seconds=TIMEOUT_S))
        last = world - 1
        if rank == last:
            time.sleep(TIMEOUT_S + 1.0)
        else:
            attempt("hang_absent", lambda: cd.clip_loss(img, txt, SCALE, mode="ring", group=short, backend="torch"))
        dist.barrier()
        short2 = dist.new_group(timeout=datetime.timedelta(seconds=TIMEOUT_S))
        if rank == last:                    # raise out of the ring after its first block, messages in flight
            calls = {"n": 0}
            orig = _blocks.InfoNCEBlocks.fwd

            def failing(self, *a, **k):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("injected failure inside the ring")
                return orig(self, *a, **k)
            _blocks.InfoNCEBlocks.fwd = failing
        dist.barrier(group=short2)          # arrive together: the handshake must pass, the ring must fail
        attempt("hang_midring", lambda: cd.clip_loss(img, txt, SCALE, mode="ring", group=short2, backend="torch"))
        if rank == last:
            _blocks.InfoNCEBlocks.fwd = orig
            time.sleep(TIMEOUT_S + 1.0)     # stay alive: the others must rely on the timeout
        res["warnings"] = warned
    finally:
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    """(world, data, [results of rank r]) -- one spawn per world size runs every configuration."""
    world = request.param
    data = _data(world)
    outdir = str(tmp_path_factory.mktemp(f"dist{world}"))
    mp.spawn(_worker, args=(world, _free_port(), data, outdir), nprocs=world, join=True)
    return world, data, [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------------------ references
def _single(fn, x, y, scale, bias):
    out, _ = _run(fn, x, y, scale, bias, record=False)
    return out


def _assert_rank(got, want, keys=("loss", "dx", "dy", "ds", "db"), **tol):
    for k in keys:
        torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{k}: {m}", **(tol or TOL64))


def _assert_global(res, want, world, keys=("loss", "dx", "dy", "ds", "db")):
    """Mean of the per-rank losses = the global loss; each rank's feature gradients = world x the global ones;
    the scalars' gradients averaged over ranks (what DDP does) = the global ones."""
    combine = dict(loss=lambda v: torch.stack(v).mean(), dx=lambda v: torch.cat(v) / world,
                   dy=lambda v: torch.cat(v) / world, ds=lambda v: torch.stack(v).mean(),
                   db=lambda v: torch.stack(v).mean())
    _assert_rank({k: combine[k]([r[k] for r in res]) for k in keys}, want, keys)


def _clip_single(x, y):
    return _single(lambda i, t, s, b: cg.clip_loss(i, t, s, b, backend="torch"), x, y, SCALE, BIAS)


# ------------------------------------------------------------------------------------------------ CLIP
@pytest.mark.parametrize("ll,gwg", LL_GWG)
def test_clip_all_gather_equals_openclip_per_rank(world_results, ll, gwg):
    world, _, res = world_results
    for r in res:
        _assert_rank(r[("clip", "all_gather", ll, gwg)], r[("clip", "openclip", ll, gwg)])


@pytest.mark.parametrize("chunk", CHUNKS)
def test_clip_ring_equals_openclip_per_rank(world_results, chunk):
    world, _, res = world_results
    for r in res:
        _assert_rank(r[("clip", "ring", chunk)], r[("clip", "openclip", True, True)], ("loss", "dx", "dy"))
    # the logit_scale / bias gradients are split differently over the ranks; their sum (DDP's mean) is OpenCLIP's
    for k in ("ds", "db"):
        torch.testing.assert_close(sum(r[("clip", "ring", chunk)][k] for r in res),
                                   sum(r[("clip", "openclip", True, True)][k] for r in res), **TOL64)


@pytest.mark.parametrize("case", [("all_gather", True, True), ("all_gather", False, True), ("ring", 1024),
                                  ("ring", 2)])
def test_clip_equals_single_process_on_concatenated_batch(world_results, case):
    world, data, res = world_results
    _assert_global([r[("clip",) + case] for r in res], _clip_single(data["img"], data["txt"]), world)


@pytest.mark.parametrize("case", [("all_gather", True), ("all_gather", False), ("ring", 1024), ("ring", 2)])
def test_clip_uneven_batches_equal_single_process(world_results, case):
    world, data, res = world_results
    want = _clip_single(data["img_u"], data["txt_u"])
    rs = [r[("clip_u",) + case] for r in res]
    if case == ("all_gather", False):               # every rank computes the global loss itself
        for r in rs:
            torch.testing.assert_close(r["loss"], want["loss"], **TOL64)
    _assert_global(rs, want, world)


# ------------------------------------------------------------------------------------------------ SigLIP
@pytest.mark.parametrize("impl", IMPLS)
def test_siglip_equals_openclip_per_rank(world_results, impl):
    world, _, res = world_results
    for r in res:
        for chunk in (CHUNKS if impl in ("shift", "bidir") else CHUNKS[:1]):
            _assert_rank(r[("siglip", impl, chunk)], r[("siglip", "openclip", impl)])
            # OpenCLIP's four dist_impls agree with each other too
            _assert_rank(r[("siglip", "openclip", impl)], r[("siglip", "openclip", "bidir")])


@pytest.mark.parametrize("impl", IMPLS)
def test_siglip_equals_single_process_even_and_uneven(world_results, impl):
    world, data, res = world_results
    for tag, x, y in (("siglip", data["img"], data["txt"]), ("siglip_u", data["img_u"], data["txt_u"])):
        want = _single(lambda i, t, s, b: cg.siglip_loss(i, t, s, b, backend="torch"), x, y, SIG_SCALE, SIG_BIAS)
        for chunk in (CHUNKS if impl in ("shift", "bidir") else CHUNKS[:1]):
            _assert_global([r[(tag, impl, chunk)] for r in res], want, world)


# ------------------------------------------------------------------------------------------------ InfoNCE
@pytest.mark.parametrize("mode,chunk", [("all_gather", 1024), ("ring", 1024), ("ring", 2)])
@pytest.mark.parametrize("use_labels", [False, True], ids=["diagonal", "labels"])
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_info_nce_equals_single_process(world_results, mode, chunk, use_labels, uneven):
    world, data, res = world_results
    sfx = "_u" if uneven else ""
    x, y, lab = data["img" + sfx], data["txt" + sfx], data["lab" + sfx]
    pos = dict(labels=lab, positives="supcon") if use_labels else {}
    want = _single(lambda q, k, s, b: cg.info_nce(q, k, temperature=1.0 / s, backend="torch", **pos), x, y, SCALE, BIAS)
    _assert_global([r[("infonce" + sfx, mode, use_labels, chunk)] for r in res], want, world,
                   ("loss", "dx", "dy", "ds"))


# ------------------------------------------------------------------------------------------------ fused backends
def _f32_rule(name, got, ref64, ref32, keys):
    for k in keys:
        assert_2x_torch(f"{name} {k}", got[k], ref64[k], ref32[k], rel_floor=2e-6, terms=4 * N * N)


@pytest.mark.skipif(not FUSED, reason="no fused backend built")
@pytest.mark.parametrize("mode", cd.MODES)
def test_fused_clip_float32(world_results, mode):
    """Per rank against float64 (exact blocks) within twice OpenCLIP's float32 error; the two modes agree."""
    world, _, res = world_results
    for be in FUSED:
        for rk, r in enumerate(res):
            got, ref32 = r[("clip_f", be, mode)], r[("clip_f", "openclip")]
            ref64 = r[("clip", "all_gather", True, True)]
            _f32_rule(f"{be} {mode} rank {rk}", got, ref64, ref32, ("loss", "dx", "dy"))
            other = r[("clip_f", be, "ring" if mode == "all_gather" else "all_gather")]
            for k in ("loss", "dx", "dy"):
                torch.testing.assert_close(got[k], other[k], rtol=1e-5, atol=1e-6)
        for k in ("ds",):
            _f32_rule(f"{be} {mode} sum", {k: sum(r[("clip_f", be, mode)][k] for r in res)},
                      {k: sum(r[("clip", "all_gather", True, True)][k] for r in res)},
                      {k: sum(r[("clip_f", "openclip")][k] for r in res)}, (k,))


@pytest.mark.skipif(not FUSED, reason="no fused backend built")
@pytest.mark.parametrize("impl", ("shift", "bidir", "gather"))
def test_fused_siglip_float32(world_results, impl):
    world, _, res = world_results
    for be in FUSED:
        for rk, r in enumerate(res):
            _f32_rule(f"{be} {impl} rank {rk}", r[("siglip_f", be, impl)], r[("siglip", impl, CHUNKS[0])],
                      r[("siglip_f", "openclip")], ("loss", "dx", "dy", "ds", "db"))


@pytest.mark.skipif(not FUSED, reason="no fused backend built")
def test_fused_info_nce_modes_agree_float32(world_results):
    world, _, res = world_results
    for be in FUSED:
        for r in res:
            a, b = r[("infonce_f", be, "all_gather")], r[("infonce_f", be, "ring")]
            ref = r[("infonce", "ring", True, 2)]
            for k in ("loss", "dx", "dy", "ds"):
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(a[k], ref[k].float(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors, warnings
def test_invalid_input_on_one_rank_raises_on_every_rank(world_results):
    world, _, res = world_results
    for key, words in (("err_local", "text"), ("err_dim", "feature dimension"), ("err_mode", "mode"),
                       ("err_flags", "local_loss"), ("err_impl", "dist_impl"), ("err_dtype", "dtype")):
        for rk, r in enumerate(res):
            name, msg, is_value_error, elapsed = r[key]
            assert is_value_error, f"{key} rank {rk}: {name}: {msg}"
            assert elapsed < 30, f"{key} rank {rk} took {elapsed:.1f} s"
            if key == "err_local" and rk != 1:
                assert "rank(s) [1]" in msg, msg
            else:
                assert words in msg, f"{key} rank {rk}: {msg}"
    for r in res:                                   # and the group is still usable afterwards
        _assert_rank(r[("clip", "after_errors")], r[("clip", "ring", 1024)])


@pytest.mark.parametrize("key", ["hang_absent", "hang_midring"])
def test_a_failing_rank_does_not_hang_the_others(world_results, key):
    world, _, res = world_results
    for rk, r in enumerate(res):
        if key == "hang_absent" and rk == world - 1:
            continue
        name, msg, _, elapsed = r[key]
        assert name != "no error", f"{key} rank {rk} returned although a rank never took part"
        if key == "hang_midring" and rk == world - 1:
            assert "injected failure" in msg
        else:
            assert elapsed < TIMEOUT_S + 15, f"{key} rank {rk} waited {elapsed:.1f} s ({name}: {msg})"


def test_ring_posts_messages_before_the_kernel_and_waits_after(world_results):
    """Every round of the ring forward and backward: post (batch_isend_irecv), kernel, wait -- never the kernel
    after a wait of the same round; and every chunk but the last hop's travels while a kernel runs."""
    world, _, res = world_results
    chunks = 3                                              # 5 rows in 2-row chunks
    for r in res:
        rounds, cur = [], None
        for ev in r["overlap_log"]:
            if isinstance(ev, tuple):
                cur = {"posted": ev[1], "events": []}
                rounds.append(cur)
            else:
                cur["events"].append(ev)
        for rd in rounds:
            ev = rd["events"]
            assert ev.count("wait") == rd["posted"]
            kernels = [i for i, e in enumerate(ev) if e in ("fwd", "bwd")]
            waits = [i for i, e in enumerate(ev) if e == "wait"]
            assert not kernels or not waits or max(kernels) < min(waits), ev
        overlapped = [rd for rd in rounds if rd["posted"] and any(e in ("fwd", "bwd") for e in rd["events"])]
        # forward: (W - 1) C rounds move keys during a kernel (+ column statistics); backward: W C rounds
        assert len(overlapped) >= (2 * world - 1) * chunks, len(overlapped)
        assert sum(e == "fwd" for rd in rounds for e in rd["events"]) == world * chunks


def test_no_future_or_deprecation_warnings(world_results):
    _, _, res = world_results
    for r in res:
        assert r["warnings"] == []


def test_deprecated_alias_warns_once_and_matches(world_results):
    _, _, res = world_results
    for r in res:
        assert len(r["alias_warnings"]) == 1, r["alias_warnings"]
        assert r["alias_warnings"][0].startswith("DeprecationWarning") and "clip_loss(" in r["alias_warnings"][0]
        _assert_rank(r["alias"], r[("clip", "all_gather", True, True)], ("loss", "dx", "dy"))


# ------------------------------------------------------------------------------------------------ one process
def test_without_process_group_every_function_is_the_single_process_loss():
    assert not dist.is_initialized()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for mode in cd.MODES:
        torch.testing.assert_close(cd.clip_loss(x, y, 2.0, mode=mode, backend="torch"),
                                   cg.clip_loss(x, y, 2.0, backend="torch"))
        torch.testing.assert_close(cd.info_nce(x, y, temperature=0.5, mode=mode, backend="torch"),
                                   cg.info_nce(x, y, temperature=0.5, backend="torch"))
    for impl in IMPLS:
        torch.testing.assert_close(cd.siglip_loss(x, y, 2.0, -1.0, dist_impl=impl, backend="torch"),
                                   cg.siglip_loss(x, y, 2.0, -1.0, backend="torch"))
    with pytest.raises(ValueError, match="not initialized"):
        cd.clip_loss(x, y, 2.0, group=object())
    with pytest.raises(ValueError, match="mode"):
        cd.clip_loss(x, y, 2.0, mode="tree")
    with pytest.raises(ValueError, match="local_loss=True, gather_with_grad=True"):
        cd.clip_loss(x, y, 2.0, mode="ring", gather_with_grad=False)
    with pytest.raises(ValueError, match="text"):
        cd.clip_loss(x, y[:, :3], 2.0)


@pytest.mark.parametrize("diag", [None, 0, 2])
def test_siglip_block_with_offset_positives_matches_dense(diag):
    """The PyTorch SigLIP block (the core has main-diagonal positives only) against autograd of the dense loss."""
    q, k = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    s, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    _blocks.ROW_BLOCK_ELEMS, saved = 8, _blocks.ROW_BLOCK_ELEMS          # 2-row blocks
    try:
        rows = _blocks.siglip_rows_fwd(q, k, s, b, diag, torch.float64)
        g = torch.rand(7, dtype=torch.float64)
        dq, dk, ds, db = _blocks.siglip_rows_bwd(q, k, s, b, diag, g, torch.float64)
    finally:
        _blocks.ROW_BLOCK_ELEMS = saved
    qq, kk, ss, bb = (t.clone().requires_grad_() for t in (q, k, s, b))
    z = ss * qq @ kk.T + bb
    y = -torch.ones_like(z)
    if diag is not None:
        i = torch.arange(diag, min(7, diag + 4))
        y[i, i - diag] = 1.0
    want = -torch.nn.functional.logsigmoid(y * z).sum(1)
    (want * g).sum().backward()
    torch.testing.assert_close(rows, want.detach(), **TOL64)
    for got, ref in ((dq, qq.grad), (dk, kk.grad), (ds, ss.grad), (db, bb.grad)):
        torch.testing.assert_close(got, ref, **TOL64)


def test_ring_plan_chunks_and_lanes():
    _ring.MAX_CHUNK_ROWS, saved = 2, _ring.MAX_CHUNK_ROWS
    try:
        plan = _ring.Plan(None, 1, 4, (5, 3, 4, 1))
    finally:
        _ring.MAX_CHUNK_ROWS = saved
    assert plan.chunks == 3
    assert [plan.bounds(0, c) for c in range(3)] == [(0, 1), (1, 3), (3, 5)]
    assert [plan.rows(3, c) for c in range(3)] == [0, 0, 1]              # a 1-row block: two empty chunks
    assert [plan.block(0, t) for t in range(4)] == [1, 0, 3, 2]
    assert _ring.ring_lanes(4, True) == ((1, 2), (-1, 1)) and _ring.ring_lanes(2, True) == ((1, 1), (-1, 0))
    assert _comm.DTYPES.index(torch.float64) == 1
