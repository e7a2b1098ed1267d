"""contrastgen.metrics: each metric against its dense float64 definition, and the ContrastiveMonitor."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from contrastgen import metrics as M

F64 = torch.float64


def test_alignment_and_uniformity_match_their_definitions():
    x, y = torch.randn(40, 6) * 3, torch.randn(40, 6)
    xn, yn = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    assert abs(M.alignment(x, y).item() - (xn - yn).norm(dim=1).pow(2).mean().item()) < 1e-5
    d2 = torch.cdist(xn, xn).pow(2)
    iu = torch.triu_indices(40, 40, 1)
    expect = torch.log(torch.exp(-2 * d2[iu[0], iu[1]]).mean()).item()
    assert abs(M.uniformity(x).item() - expect) < 1e-4
    with pytest.raises(ValueError, match="at least 2"):
        M.uniformity(x[:1])


def test_uniformity_runs_fused_at_large_n():
    """N = 8192 (a dense float32 matrix would be 256 MiB): the fused op, checked blockwise in float64."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(8192, 4, generator=g, dtype=F64), dim=1)
    got = M.uniformity(x.float()).item()
    total = torch.zeros((), dtype=F64)
    for i in range(0, 8192, 2048):
        d2 = torch.cdist(x[i:i + 2048], x).pow(2)
        total += torch.exp(-2 * d2).sum()
    n = 8192
    expect = math.log((total.item() - n) / (n * (n - 1)))          # i != j, each pair twice: the same mean as i < j
    assert abs(got - expect) < 1e-4
    sub = M.uniformity(x.float(), max_samples=512, generator=torch.Generator().manual_seed(1)).item()
    assert abs(sub - expect) < 0.1


def test_similarity_gap_and_effective_temperature():
    x, y = torch.randn(30, 5), torch.randn(30, 5)
    c = F.normalize(x.double(), dim=1) @ F.normalize(y.double(), dim=1).T
    off = ~torch.eye(30, dtype=torch.bool)
    gap = M.similarity_gap(x, y)
    assert gap["pos"] == pytest.approx(c.diagonal().mean().item(), abs=1e-10)
    assert gap["neg"] == pytest.approx(c[off].mean().item(), abs=1e-10)
    assert gap["gap"] == pytest.approx(gap["pos"] - gap["neg"], abs=1e-12)
    u = F.normalize(x, dim=1)
    assert M.effective_temperature(u, temperature=0.1) == pytest.approx(0.1, rel=1e-5)
    assert M.effective_temperature(2 * u, 3 * u, logit_scale=10.0) == pytest.approx(0.1 / 6, rel=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        M.effective_temperature(u)
    with pytest.raises(ValueError, match="same shape"):
        M.similarity_gap(x, y[:5])


def test_effective_rank_detects_collapse():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 16, generator=g)
    assert M.effective_rank(iso) > 15.0
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g) + 1e-4 * torch.randn(500, 16, generator=g)
    assert M.effective_rank(line, normalize=False) < 1.1
    two = torch.cat([torch.randn(500, 2, generator=g), torch.zeros(500, 14)], 1)
    assert 1.8 < M.effective_rank(two, normalize=False) < 2.0 + 1e-6


class _Writer:
    def __init__(self):
        self.rows = []

    def add_scalar(self, tag, value, step):
        self.rows.append((tag, value, step))


def test_monitor_logs_plots_and_writes(tmp_path):
    w = _Writer()
    mon = M.ContrastiveMonitor(writer=w, every=2, uniformity_samples=64)
    for step in range(6):
        x, y = torch.randn(32, 8), torch.randn(32, 8)
        out = mon.log(step, x, y if step != 4 else None, loss=torch.tensor(1.0 / (step + 1)), temperature=0.07,
                      lr=1e-3)
        assert (out == {}) == (step % 2 == 1)
    h = mon.history
    assert h["step"] == [0, 2, 4]
    assert all(len(v) == 3 for v in h.values())
    assert math.isnan(h["alignment"][2]) and math.isfinite(h["alignment"][1])
    assert h["lr"] == [1e-3] * 3 and h["loss"][0] == 1.0
    assert ("contrastive/uniformity", h["uniformity"][1], 2) in w.rows
    png = mon.plot(tmp_path / "m.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = json.loads(mon.save_json(tmp_path / "m.json").read_text())
    assert js["alignment"][2] is None and js["step"] == [0, 2, 4]
    assert "align" in M.ContrastiveMonitor.format(mon.last())
    with pytest.raises(TypeError, match="extra scalar"):
        mon.log(0, torch.randn(4, 2), note="x")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        mon.log(0, torch.randn(4))
