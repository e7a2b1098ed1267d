"""DALL-E 2 / unCLIP (Ramesh et al. 2022) pieces: a two-tower CLIP on the fused CLIP loss and a diffusion prior.

* :class:`TextTransformer` -- a small causal text transformer (CLIP's text tower in miniature): token and position
  embeddings, pre-norm blocks, the feature of the last real token (CLIP's EOT) projected to the joint space; it
  also returns the per-token features, which the prior is conditioned on.
* :func:`vit_image_tower` -- a timm VisionTransformer built from its configuration (ViT-tiny width 192, 3 heads;
  depth and patch size configurable; nothing is downloaded), its head projecting to the joint space.
* :class:`CLIP` -- both towers, :class:`contrastgen.nn.ClipLoss` and :class:`contrastgen.nn.LogitScale` (learnable log-scale, init ln(1/0.07), clamped to
  ln 100): the CLIP objective on the fused InfoNCE core.
* :class:`DiffusionPrior` -- maps a CLIP text embedding (and the text's token features) to a CLIP image embedding.
  As in the paper (and lucidrains/DALLE2-pytorch's ``DiffusionPriorNetwork``): a decoder-only (causal) transformer
  over the sequence [text tokens, text embedding, timestep embedding, noised image embedding, learned query]; the
  output at the last position is the prediction of the *clean* image embedding, trained with MSE; the text
  condition (embedding and tokens) is replaced by learned null embeddings with probability ``cond_drop_prob`` so
  that sampling can use classifier-free guidance.  Image embeddings are unit-normalised and scaled by sqrt(dim)
  (DALLE2-pytorch's ``image_embed_scale``) so their coordinates have unit variance like the noise.  Noise schedule
  and samplers are diffusers' (``DDPMScheduler`` with ``prediction_type="sample"``, cosine betas; DDIM or DDPM
  sampling with fewer, strided steps).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ClipLoss, LogitScale


# ----------------------------------------------------------------------------------------------- towers
class Block(nn.Module):
    """Pre-norm transformer block (``scaled_dot_product_attention`` with a boolean mask, True = may attend); plain
    tensor ops only, so ``torch.compile(fullgraph=True)`` traces it (``nn.MultiheadAttention``'s mask checks do not)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, allowed):
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln2(x))


class TextTransformer(nn.Module):
    """Token ids (B, L) with ``pad_id`` padding -> (embedding (B, embed_dim), token features (B, L, width), mask (B, L))."""

    def __init__(self, vocab_size: int, embed_dim: int, context_length: int = 16, width: int = 128, layers: int = 2,
                 heads: int = 4, pad_id: int = 0):
        super().__init__()
        self.pad_id, self.context_length, self.width = pad_id, context_length, width
        self.token = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.register_buffer("causal", torch.ones(context_length, context_length, dtype=torch.bool).tril(),
                             persistent=False)   # True = may attend

    def forward(self, ids: torch.Tensor):
        b, length = ids.shape
        if length > self.context_length:
            raise ValueError(f"ids of shape {tuple(ids.shape)} are longer than context_length={self.context_length}")
        mask = ids != self.pad_id
        x = self.token(ids) + self.pos[:length]
        for blk in self.blocks:
            x = blk(x, self.causal[:length, :length])
        x = self.ln(x)
        last = (mask.long().sum(1) - 1).clamp_min(0)
        pooled = x[torch.arange(b, device=ids.device), last]
        return self.proj(pooled), x, mask


def vit_image_tower(embed_dim: int, img_size: int = 32, patch_size: int = 8, depth: int = 12, width: int = 192,
                    heads: int = 3, in_chans: int = 3) -> nn.Module:
    """timm ViT built from config (ViT-tiny: width 192, 3 heads, depth 12), head -> ``embed_dim``; random init."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=embed_dim,
                             embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, class_token=True,
                             global_pool="token")


class CLIP(nn.Module):
    """Two towers and the fused CLIP loss; embeddings are L2-normalised."""

    def __init__(self, image_tower: nn.Module, text_tower: TextTransformer, backend=None):
        super().__init__()
        self.visual, self.text = image_tower, text_tower
        self.scale = LogitScale.clip()          # learnable exp(theta), init 1/0.07, clamped to [1, 100]
        self.loss_fn = ClipLoss(backend=backend)

    def encode_image(self, images):
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, ids):
        emb, tokens, mask = self.text(ids)
        return F.normalize(emb, dim=-1), tokens, mask

    def forward(self, images, ids):
        """The CLIP loss of a batch of paired (image, caption)."""
        return self.loss_fn(self.encode_image(images), self.encode_text(ids)[0], self.scale())

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale.log_scale.exp()


# ----------------------------------------------------------------------------------------------- prior
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


class DiffusionPrior(nn.Module):
    """CLIP text embedding (+ text token features) -> CLIP image embedding, by diffusion in embedding space.

    ``loss(text_embed, text_tokens, text_mask, image_embed)``: MSE between the predicted and the clean (scaled)
    image embedding at a uniformly drawn timestep.  ``sample(text_embed, text_tokens, text_mask, steps=64,
    guidance_scale=1.0)``: unit-norm image embeddings.  text_embed, image_embed (B, E); text_tokens (B, L, T);
    text_mask (B, L) bool (True = real token)."""

    def __init__(self, embed_dim: int, token_dim: int, max_text_len: int, width: int = 256, depth: int = 4,
                 heads: int = 4, num_train_timesteps: int = 1000, cond_drop_prob: float = 0.1,
                 beta_schedule: str = "squaredcos_cap_v2"):
        super().__init__()
        from diffusers import DDPMScheduler
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1), got {cond_drop_prob}")
        self.embed_dim, self.max_text_len, self.cond_drop_prob = embed_dim, max_text_len, cond_drop_prob
        self.scale = math.sqrt(embed_dim)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       prediction_type="sample", clip_sample=False)
        self.token_in = nn.Linear(token_dim, width)
        self.text_in = nn.Linear(embed_dim, width)
        self.image_in = nn.Linear(embed_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.null_text_embed = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.null_text_tokens = nn.Parameter(torch.randn(max_text_len, token_dim) * 0.02)
        n = max_text_len + 4
        self.pos = nn.Parameter(torch.randn(n, width) * 0.02)
        self.net = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)
        self.register_buffer("causal", torch.ones(n, n, dtype=torch.bool).tril(), persistent=False)   # True = may attend
        self.width = width

    def _check(self, text_embed, text_tokens, text_mask):
        b = text_embed.shape[0]
        if text_embed.shape != (b, self.embed_dim):
            raise ValueError(f"text_embed must be (B, {self.embed_dim}), got {tuple(text_embed.shape)}")
        if text_tokens.dim() != 3 or text_tokens.shape[0] != b or text_tokens.shape[1] > self.max_text_len:
            raise ValueError(f"text_tokens must be (B, L <= {self.max_text_len}, T), got {tuple(text_tokens.shape)}")
        if text_mask.shape != text_tokens.shape[:2]:
            raise ValueError(f"text_mask must be (B, L) = {tuple(text_tokens.shape[:2])}, got {tuple(text_mask.shape)}")

    def _pad(self, text_tokens, text_mask):
        pad = self.max_text_len - text_tokens.shape[1]
        if pad:
            text_tokens = F.pad(text_tokens, (0, 0, 0, pad))
            text_mask = F.pad(text_mask, (0, pad), value=False)
        return text_tokens, text_mask

    def denoise(self, x_t, t, text_embed, text_tokens, text_mask, drop: Optional[torch.Tensor] = None):
        """Predicted clean (scaled) image embedding from x_t at timesteps t (B,); ``drop`` (B,) bool replaces the
        text condition of those rows by the null condition."""
        text_tokens, text_mask = self._pad(text_tokens, text_mask)
        if drop is not None:
            d = drop[:, None]
            text_embed = torch.where(d, self.null_text_embed.to(text_embed.dtype)[None], text_embed)
            text_tokens = torch.where(d[:, :, None], self.null_text_tokens.to(text_tokens.dtype)[None], text_tokens)
            text_mask = text_mask | d          # the null tokens are all attended to
        b = x_t.shape[0]
        seq = torch.cat([self.token_in(text_tokens), self.text_in(text_embed)[:, None],
                         self.time_mlp(timestep_embedding(t, self.width))[:, None], self.image_in(x_t)[:, None],
                         self.query.expand(b, 1, -1)], 1) + self.pos
        keep = torch.cat([text_mask, torch.ones(b, 4, dtype=torch.bool, device=x_t.device)], 1)
        # causal attention: a query row whose every visible key is padding would be all -inf (NaN); the text is
        # left-aligned, so keeping position 0 visible is enough
        keep[:, 0] = True
        allowed = self.causal[None, None] & keep[:, None, None, :]                   # (B, 1, n, n)
        h = seq
        for blk in self.net:
            h = blk(h, allowed)
        return self.out(self.ln(h[:, -1]))

    def loss(self, text_embed, text_tokens, text_mask, image_embed, generator: Optional[torch.Generator] = None):
        self._check(text_embed, text_tokens, text_mask)
        b, dev = image_embed.shape[0], image_embed.device
        x0 = F.normalize(image_embed, dim=-1) * self.scale
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=dev, generator=generator)
        noise = torch.randn(x0.shape, device=dev, dtype=x0.dtype, generator=generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        drop = torch.rand(b, device=dev, generator=generator) < self.cond_drop_prob if self.training else None
        return F.mse_loss(self.denoise(x_t, t, text_embed, text_tokens, text_mask, drop), x0)

    @torch.no_grad()
    def sample(self, text_embed, text_tokens, text_mask, steps: int = 64, guidance_scale: float = 1.0,
               sampler: str = "ddim", generator: Optional[torch.Generator] = None) -> torch.Tensor:
        from diffusers import DDIMScheduler, DDPMScheduler
        self._check(text_embed, text_tokens, text_mask)
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        sched = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        b, dev = text_embed.shape[0], text_embed.device
        x = torch.randn(b, self.embed_dim, device=dev, generator=generator)
        no_drop = torch.zeros(b, dtype=torch.bool, device=dev)
        for t in sched.timesteps:
            tt = torch.full((b,), int(t), device=dev, dtype=torch.long)
            pred = self.denoise(x, tt, text_embed, text_tokens, text_mask, no_drop)
            if guidance_scale != 1.0:
                null = self.denoise(x, tt, text_embed, text_tokens, text_mask, ~no_drop)
                pred = null + guidance_scale * (pred - null)
            kw = {"generator": generator} if sampler == "ddpm" else {}
            x = sched.step(pred, t, x, **kw).prev_sample
        return F.normalize(x, dim=-1)


def retrieval_accuracy(queries: torch.Tensor, gallery: torch.Tensor, query_keys, gallery_keys, topk=(1, 5)) -> dict:
    """Fraction of queries whose top-k nearest gallery items (cosine) contain one with the query's key
    (e.g. the caption's attributes): ``{"top1": ..., "top5": ...}``."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    qk = torch.as_tensor(query_keys)
    gk = torch.as_tensor(gallery_keys)
    out = {}
    for k in topk:
        idx = sims.topk(min(k, gallery.shape[0]), dim=1).indices
        out[f"top{k}"] = float((gk[idx] == qk[:, None]).any(1).float().mean())
    return out
