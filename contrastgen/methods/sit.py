"""DiT / SiT: a class-conditional diffusion transformer with adaLN-Zero, the SiT velocity objective and ODE samplers.

Built from timm's ``PatchEmbed``, ``Attention`` and ``Mlp`` as in the official DiT (facebookresearch/DiT) and SiT
(willisma/SiT) code; written from their description, not copied.  Learn-sigma is not supported (SiT with the
velocity objective does not need it).

Interpolant convention (SiT's "Linear" path, used everywhere in this module)::

    t ~ U[0, 1],  noise ~ N(0, I),  x_t = t * x + (1 - t) * noise        (t = 0: pure noise, t = 1: data)
    target velocity v = dx_t/dt = x - noise,   loss = mean ||v_theta(x_t, t, y) - v||^2

Sampling integrates dx/dt = v_theta(x, t, y) from t = 0 (noise) to t = 1 (data) with Euler or Heun steps;
classifier-free guidance mixes conditional and unconditional velocities, ``v_u + s (v_c - v_u)``.

Model sizes (depth / hidden / heads, patch 2): S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16, plus "tiny"
(2/32/2 on 8x8 inputs) for tests.  ``sit_models["SiT-XL/2"](**overrides)`` or ``SiT(SIT_CONFIGS["SiT-XL/2"])``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn
from timm.layers import Attention, Mlp, PatchEmbed

__all__ = ["SiTConfig", "SiT", "SIT_CONFIGS", "sit_models", "TimestepEmbedder", "LabelEmbedder", "SiTBlock",
           "FinalLayer", "sit_loss", "interpolate", "sample_euler", "sample_heun", "sample"]


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SiTConfig:
    input_size: int = 32          # latent (or pixel) side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1   # label dropout for classifier-free guidance
    num_classes: int = 1000
    time_scale: float = 1.0       # t in [0, 1] is multiplied by this before the sinusoidal embedding (SiT: 1)

    def replace(self, **kw) -> "SiTConfig":
        return dataclasses.replace(self, **kw)


SIT_CONFIGS: Dict[str, SiTConfig] = {
    "SiT-S/2": SiTConfig(depth=12, hidden_size=384, num_heads=6),
    "SiT-B/2": SiTConfig(depth=12, hidden_size=768, num_heads=12),
    "SiT-L/2": SiTConfig(depth=24, hidden_size=1024, num_heads=16),
    "SiT-XL/2": SiTConfig(depth=28, hidden_size=1152, num_heads=16),
    "SiT-tiny/2": SiTConfig(input_size=8, in_channels=1, depth=2, hidden_size=32, num_heads=2, num_classes=10),
}


# --------------------------------------------------------------------------- building blocks
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (B, T, H) by per-sample shift/scale (B, H)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> sinusoidal frequency embedding -> MLP (Linear, SiLU, Linear)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) possibly fractional timesteps -> (B, dim) ``[cos(t f_k), sin(t f_k)]``, f_k = max_period^(-k/half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t * self.time_scale, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> embeddings; index ``num_classes`` is the null class used for classifier-free guidance.
    During training each label is replaced by the null class with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: the condition c (B, H) regresses shift, scale and gate
    for the attention and MLP branches; the gates start at zero so every block starts as the identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear to patch_size^2 * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding (grid_size^2, embed_dim), as in MAE/DiT: half the channels encode
    the row, half the column; embed_dim must be a multiple of 4."""
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2D sin-cos position embedding, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gh, gw = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0))

    def one_axis(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # DiT uses grid[0] = w-coordinates for the first half of the channels
    return torch.cat([one_axis(gw), one_axis(gh)], dim=1).float()


# --------------------------------------------------------------------------- the model
class SiT(nn.Module):
    """Diffusion transformer predicting the velocity ``v(x_t, t, y)`` (same shape as x).

    ``SiT(config)`` with a :class:`SiTConfig` or the name of one in :data:`SIT_CONFIGS`; keyword overrides replace
    config fields, e.g. ``SiT("SiT-S/2", input_size=16, in_channels=1, num_classes=10)``.
    The transformer blocks are ``model.blocks`` (a ``ModuleList``): hook one of them with
    :class:`contrastgen.methods.dispersive.DispersiveRegularizer`.
    """

    def __init__(self, config: SiTConfig | str | None = None, **overrides):
        super().__init__()
        if config is None:
            config = SiTConfig()
        elif isinstance(config, str):
            if config not in SIT_CONFIGS:
                raise ValueError(f"unknown SiT config {config!r}; expected one of {sorted(SIT_CONFIGS)}")
            config = SIT_CONFIGS[config]
        if overrides:
            config = config.replace(**overrides)
        if config.input_size % config.patch_size:
            raise ValueError(f"input_size {config.input_size} is not a multiple of patch_size {config.patch_size}")
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}")
        self.config = c = config
        self.in_channels = self.out_channels = c.in_channels
        self.patch_size = c.patch_size
        self.num_classes = c.num_classes

        self.x_embedder = PatchEmbed(c.input_size, c.patch_size, c.in_channels, c.hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(c.hidden_size, time_scale=c.time_scale)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(c.hidden_size, int(num_patches ** 0.5))[None],
                             persistent=False)
        self.blocks = nn.ModuleList([SiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:                         # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) class labels (``num_classes`` = null class) -> velocity."""
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: ``v_uncond + cfg_scale * (v_cond - v_uncond)`` (one batched forward)."""
        if cfg_scale == 1.0:
            return self(x, t, y)
        null = torch.full_like(y, self.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)


def _make(name: str) -> Callable[..., SiT]:
    def build(**overrides) -> SiT:
        return SiT(SIT_CONFIGS[name], **overrides)
    build.__name__ = name.replace("-", "_").replace("/", "_")
    return build


sit_models: Dict[str, Callable[..., SiT]] = {name: _make(name) for name in SIT_CONFIGS}


# --------------------------------------------------------------------------- objective
def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Linear interpolant: ``x_t = t x + (1 - t) noise`` and its velocity ``x - noise``; t (B,)."""
    tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return tt * x + (1 - tt) * noise, x - noise


def sit_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, t: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SiT velocity-matching loss (scalar): mean over batch and elements of ``(v_theta(x_t, t, y) - (x - noise))^2``
    with ``t ~ U[0, 1]`` and Gaussian noise unless given."""
    if t is None:
        t = torch.rand(x.shape[0], device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_t, v = interpolate(x, noise, t)
    pred = model(x_t, t, y)
    return (pred.float() - v.float()).pow(2).mean()


# --------------------------------------------------------------------------- samplers
def _velocity(model, x, t, y, cfg_scale):
    tb = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
    if hasattr(model, "forward_with_cfg"):
        return model.forward_with_cfg(x, tb, y, cfg_scale)
    if cfg_scale != 1.0:
        raise ValueError("cfg_scale != 1 needs a model with forward_with_cfg")
    return model(x, tb, y)


def _time_steps(steps: int):
    """The (t0, t1) intervals of a uniform grid from t = 0 (noise) to t = 1 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = torch.linspace(0.0, 1.0, steps + 1).tolist()
    return list(zip(ts[:-1], ts[1:]))


@torch.no_grad()
def sample_euler(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 50,
                 cfg_scale: float = 1.0) -> torch.Tensor:
    """Euler ODE solver from t = 0 (noise) to t = 1 (data): ``steps`` model evaluations (x2 batch with CFG)."""
    x = noise
    for t0, t1 in _time_steps(steps):
        x = x + (t1 - t0) * _velocity(model, x, t0, y, cfg_scale)
    return x


@torch.no_grad()
def sample_heun(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 25,
                cfg_scale: float = 1.0) -> torch.Tensor:
    """Heun (explicit trapezoidal) ODE solver from t = 0 to t = 1: 2 * ``steps`` model evaluations."""
    x = noise
    for t0, t1 in _time_steps(steps):
        dt = t1 - t0
        d0 = _velocity(model, x, t0, y, cfg_scale)
        x_pred = x + dt * d0
        d1 = _velocity(model, x_pred, t1, y, cfg_scale)
        x = x + 0.5 * dt * (d0 + d1)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def sample(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, method: str = "heun", steps: int = 25,
           cfg_scale: float = 1.0) -> torch.Tensor:
    """Dispatch to :func:`sample_euler` or :func:`sample_heun`."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[method](model, noise, y, steps=steps, cfg_scale=cfg_scale)
