"""Distributed CLIP loss on 2 gloo processes against the single-process loss of the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import contrastgen as cg
from contrastgen.distributed import clip_loss_distributed

WORLD, N, D = 2, 5, 7


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = [(False, "torch"), (True, "torch"), (False, None), (True, None)]


def _worker(rank, port, img, txt, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        sl = slice(rank * N, (rank + 1) * N)
        for local_loss, backend in CONFIGS:
            i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
            scale = torch.tensor(5.0, dtype=img.dtype, requires_grad=True)
            loss = clip_loss_distributed(i, t, scale, local_loss=local_loss, backend=backend)
            loss.backward()
            out[(rank, local_loss, backend)] = (loss.detach(), i.grad, t.grad, scale.grad)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def batch_and_results():
    """One 2-process run covers every configuration (process start-up dominates the cost)."""
    torch.manual_seed(0)
    img, txt = torch.randn(WORLD * N, D, dtype=torch.float64), torch.randn(WORLD * N, D, dtype=torch.float64)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), img, txt, out), nprocs=WORLD, join=True)
    return img, txt, dict(out)


@pytest.mark.parametrize("local_loss,backend", CONFIGS)
def test_distributed_clip_matches_single_process(batch_and_results, local_loss, backend):
    img, txt, out = batch_and_results
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    want = cg.clip_loss(i, t, scale, backend="torch")
    want.backward()
    res = [out[(r, local_loss, backend)] for r in range(WORLD)]
    losses = torch.stack([r[0] for r in res])
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.mean(), want.detach(), **tol)
    if not local_loss:
        torch.testing.assert_close(losses[0], losses[1], **tol)
    # each rank's feature gradient is WORLD x the global gradient (DDP averages it back)
    torch.testing.assert_close(torch.cat([r[1] for r in res]) / WORLD, i.grad, **tol)
    torch.testing.assert_close(torch.cat([r[2] for r in res]) / WORLD, t.grad, **tol)
    # the scale's gradient, averaged over ranks as DDP would
    torch.testing.assert_close(torch.stack([r[3] for r in res]).mean(), scale.grad, **tol)
