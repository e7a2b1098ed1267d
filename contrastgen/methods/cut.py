"""CUT / FastCUT (Park et al., ECCV 2020; taesungp/contrastive-unpaired-translation): the ResNet generator, the
PatchGAN discriminator, the two presets and one training step, sized by arguments so that they run on a CPU.

    cfg = CUTConfig.cut()                     # or CUTConfig.fastcut()
    model = CUTModel(cfg, input_nc=3, output_nc=3, ngf=16, n_blocks=6, ndf=16, n_layers_d=2)
    for real_a, real_b in loader:             # unpaired batches of the two domains
        losses = model.train_step(real_a, real_b)

The layer indices of :class:`ResnetGenerator` follow the official ``nn.Sequential`` (antialiased down/upsampling,
``no_antialias=False``), so CUT's ``nce_layers = 0,4,8,12,16`` pick the padded input, the first conv block's
output, the two downsampling stages and the fifth residual block.  Defaults are the official ones: instance norm,
xavier init (gain 0.02), LSGAN, Adam(2e-4, betas (0.5, 0.999)), lambda_GAN 1; CUT: lambda_NCE 1 with the identity
PatchNCE term on G(Y) and Y; FastCUT: lambda_NCE 10, no identity term, flip-equivariance augmentation.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .patchnce import PatchNCELoss, PatchSampler, init_weights


# ----------------------------------------------------------------------------------------------- building blocks
def _binomial(size: int) -> Tensor:
    row = torch.tensor([float(math.comb(size - 1, i)) for i in range(size)])
    f = row[:, None] * row[None, :]
    return f / f.sum()


class Downsample(nn.Module):
    """Anti-aliased stride-2 downsampling (blur then subsample): reflect pad, depthwise binomial 3x3, stride 2."""

    def __init__(self, channels: int, filt_size: int = 3):
        super().__init__()
        self.pad = (filt_size - 1) // 2, (filt_size - 1 + 1) // 2
        self.register_buffer("filt", _binomial(filt_size)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        p0, p1 = self.pad
        return F.conv2d(F.pad(x, (p0, p1, p0, p1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """Anti-aliased x2 upsampling: replicate pad 1, depthwise transposed conv with the 4x4 binomial filter (x4),
    cropped to 2H x 2W."""

    def __init__(self, channels: int, filt_size: int = 4):
        super().__init__()
        self.filt_size = filt_size
        self.register_buffer("filt", (_binomial(filt_size) * 4)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        pad = (self.filt_size - 1) // 2
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=1 + pad,
                               groups=x.shape[1])[:, :, 1:, 1:]
        return y if self.filt_size % 2 == 1 else y[:, :, :-1, :-1]


def norm_layer(kind: str):
    if kind == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    if kind == "batch":
        return lambda c: nn.BatchNorm2d(c, affine=True, track_running_stats=True)
    if kind == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"norm must be 'instance', 'batch' or 'none', got {kind!r}")


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm, use_bias: bool, use_dropout: bool = False):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), norm(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), norm(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """CUT's ResNet generator (``resnet_9blocks`` with ``n_blocks=9``): c7s1-ngf, two anti-aliased downsampling
    stages, ``n_blocks`` residual blocks at 4 ngf channels, two anti-aliased upsampling stages, c7s1-output, tanh.

    ``forward(x)`` -> image; ``forward(x, layers=[...], encode_only=True)`` -> the outputs of those
    ``nn.Sequential`` indices (stops after the last one), as CUT's ``netG(x, nce_layers, encode_only=True)``."""

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9, norm: str = "instance",
                 use_dropout: bool = False, init_type: str = "xavier", init_gain: float = 0.02):
        super().__init__()
        nl = norm_layer(norm)
        use_bias = norm == "instance"
        m: List[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=use_bias), nl(ngf), nn.ReLU(True)]
        for i in range(2):
            c = ngf * 2 ** i
            m += [nn.Conv2d(c, 2 * c, 3, padding=1, bias=use_bias), nl(2 * c), nn.ReLU(True), Downsample(2 * c)]
        m += [ResnetBlock(4 * ngf, nl, use_bias, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            m += [Upsample(c), nn.Conv2d(c, c // 2, 3, padding=1, bias=use_bias), nl(c // 2), nn.ReLU(True)]
        m += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*m)
        init_weights(self, init_type, init_gain)

    def forward(self, x: Tensor, layers: Optional[Sequence[int]] = None, encode_only: bool = False):
        if not layers:
            return self.model(x)
        want = set(int(i) for i in layers)
        last = max(want)
        feats = []
        for i, layer in enumerate(self.model):
            x = layer(x)
            if i in want:
                feats.append(x)
            if encode_only and i == last:
                return feats
        return x, feats


class NLayerDiscriminator(nn.Module):
    """CUT's PatchGAN discriminator (``basic`` with n_layers=3): anti-aliased 4x4 conv stages with LeakyReLU(0.2),
    a stride-1 stage, and a 1-channel 4x4 prediction map (no sigmoid: LSGAN / BCE-with-logits)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                 init_type: str = "xavier", init_gain: float = 0.02):
        super().__init__()
        nl = norm_layer(norm)
        use_bias = norm == "instance"
        seq: List[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, padding=1), nn.LeakyReLU(0.2, True), Downsample(ndf)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, padding=1, bias=use_bias), nl(ndf * mult),
                    nn.LeakyReLU(0.2, True), Downsample(ndf * mult)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, padding=1, bias=use_bias), nl(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, 4, padding=1)]
        self.model = nn.Sequential(*seq)
        init_weights(self, init_type, init_gain)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def gan_loss(pred: Tensor, target_is_real: bool, mode: str = "lsgan") -> Tensor:
    """CUT's ``GANLoss``: lsgan = MSE to 1 / 0, vanilla = BCE with logits, nonsaturating = softplus(-/+ pred)."""
    if mode == "lsgan":
        return F.mse_loss(pred, torch.full_like(pred, 1.0 if target_is_real else 0.0))
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred, torch.full_like(pred, 1.0 if target_is_real else 0.0))
    if mode == "nonsaturating":
        return F.softplus(-pred if target_is_real else pred).mean()
    raise ValueError(f"gan_mode must be 'lsgan', 'vanilla' or 'nonsaturating', got {mode!r}")


# ----------------------------------------------------------------------------------------------- presets
@dataclasses.dataclass
class CUTConfig:
    """Training options of CUT's ``cut_model.py`` (defaults: the official CUT preset)."""
    lambda_gan: float = 1.0
    lambda_nce: float = 1.0
    nce_idt: bool = True
    nce_layers: tuple = (0, 4, 8, 12, 16)
    num_patches: int = 256
    nce_t: float = 0.07
    netf_nc: int = 256
    use_mlp: bool = True
    all_negatives_from_minibatch: bool = False
    flip_equivariance: bool = False
    gan_mode: str = "lsgan"
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    init_type: str = "xavier"
    init_gain: float = 0.02

    @classmethod
    def cut(cls, **overrides) -> "CUTConfig":
        """CUT: lambda_NCE = 1 with the identity PatchNCE term (NCE(G(Y), Y))."""
        return cls(**{"lambda_nce": 1.0, "nce_idt": True, "flip_equivariance": False, **overrides})

    @classmethod
    def fastcut(cls, **overrides) -> "CUTConfig":
        """FastCUT: lambda_NCE = 10, no identity term, flip-equivariance augmentation."""
        return cls(**{"lambda_nce": 10.0, "nce_idt": False, "flip_equivariance": True, **overrides})


PRESETS = {"cut": CUTConfig.cut, "fastcut": CUTConfig.fastcut}


class CUTModel(nn.Module):
    """Generator G, discriminator D and PatchNCE (with its sampler F) with CUT's optimisation step.

    ``train_step(real_a, real_b)`` performs CUT's ``optimize_parameters``: forward G on A (and B for the identity
    term), update D on (fake detached, real), update G (and F) on ``lambda_GAN * GAN(G(A)) + NCE`` where NCE is
    ``PatchNCE(G(A), A)``, averaged with ``PatchNCE(G(B), B)`` when ``nce_idt``.  ``lambda_nce = 0`` drops the
    PatchNCE terms (a plain LSGAN generator: the ablation of the demo).  The sampler's heads are created by the
    first step (CUT's ``data_dependent_initialize``) and its optimizer right after.
    """

    def __init__(self, cfg: CUTConfig, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9,
                 ndf: int = 64, n_layers_d: int = 3, norm: str = "instance", backend: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.netG = ResnetGenerator(input_nc, output_nc, ngf, n_blocks, norm, init_type=cfg.init_type,
                                    init_gain=cfg.init_gain)
        self.netD = NLayerDiscriminator(output_nc, ndf, n_layers_d, norm, init_type=cfg.init_type,
                                        init_gain=cfg.init_gain)
        sampler = PatchSampler(cfg.num_patches, cfg.use_mlp, cfg.netf_nc, cfg.init_type, cfg.init_gain)
        self.nce = PatchNCELoss(cfg.nce_layers, weight=cfg.lambda_nce, temperature=cfg.nce_t,
                                all_negatives_from_minibatch=cfg.all_negatives_from_minibatch, sampler=sampler,
                                backend=backend)
        self.opt_g = torch.optim.Adam(self.netG.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.netD.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.opt_f: Optional[torch.optim.Optimizer] = None

    def nce_loss(self, src: Tensor, tgt: Tensor, flipped: bool = False) -> Tensor:
        """CUT's ``calculate_NCE_loss``: queries from G's encoder on the translation, keys on the source."""
        layers = self.nce.layers
        feat_q = self.netG(tgt, layers, encode_only=True)
        if flipped:
            feat_q = [torch.flip(f, [3]) for f in feat_q]
        feat_k = self.netG(src, layers, encode_only=True)
        return self.nce(feat_q, feat_k)

    @torch.no_grad()
    def translate(self, x: Tensor) -> Tensor:
        return self.netG(x)

    def train_step(self, real_a: Tensor, real_b: Tensor) -> Dict[str, float]:
        cfg = self.cfg
        use_nce = cfg.lambda_nce > 0
        real = torch.cat([real_a, real_b]) if (cfg.nce_idt and use_nce) else real_a
        flipped = cfg.flip_equivariance and random.random() < 0.5
        if flipped:
            real = torch.flip(real, [3])
        fake = self.netG(real)
        fake_b = fake[:real_a.shape[0]]
        idt_b = fake[real_a.shape[0]:] if (cfg.nce_idt and use_nce) else None

        # D: fake detached, real
        for p in self.netD.parameters():
            p.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d_fake = gan_loss(self.netD(fake_b.detach()), False, cfg.gan_mode)
        loss_d_real = gan_loss(self.netD(real_b), True, cfg.gan_mode)
        loss_d = 0.5 * (loss_d_fake + loss_d_real)
        loss_d.backward()
        self.opt_d.step()

        # G (and F)
        for p in self.netD.parameters():
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        if self.opt_f is not None:
            self.opt_f.zero_grad(set_to_none=True)
        loss_g_gan = gan_loss(self.netD(fake_b), True, cfg.gan_mode) * cfg.lambda_gan
        out = {"D": loss_d.item(), "D_real": loss_d_real.item(), "D_fake": loss_d_fake.item(), "G_GAN": loss_g_gan.item()}
        loss_g = loss_g_gan
        if use_nce:
            loss_nce = self.nce_loss(real_a, fake_b, flipped)
            out["NCE"] = loss_nce.item()
            if cfg.nce_idt:
                loss_nce_y = self.nce_loss(real_b, idt_b, flipped)
                out["NCE_Y"] = loss_nce_y.item()
                loss_nce = 0.5 * (loss_nce + loss_nce_y)
            loss_g = loss_g + loss_nce
        loss_g.backward()
        self.opt_g.step()
        if use_nce:
            if self.opt_f is None:   # the heads exist now (created by the first PatchNCE call)
                self.opt_f = torch.optim.Adam(self.nce.sampler.parameters(), lr=cfg.lr, betas=cfg.betas)
            else:
                self.opt_f.step()
        out["G"] = loss_g.item()
        return out
