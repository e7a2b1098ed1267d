"""``contrastgen demo conform``: CONFORM on a tiny text-to-image model trained here, on CPU, in minutes.

No pretrained Stable Diffusion can be had offline, so the demo trains one (in pixel space):

1. :func:`render_scene` draws 32 x 32 RGB scenes of two coloured shapes (square / circle / triangle, in red,
   green, blue, yellow) with captions "a red square and a blue circle" (:func:`sample_scene_specs`).
2. :func:`build_text_to_image` builds a small diffusers ``UNet2DConditionModel`` with cross-attention and a
   2-layer ``CLIPTextModel`` from config, with a word-level tokenizer made in memory (:func:`word_tokenizer`);
   :func:`train_text_to_image` trains both with the epsilon-prediction loss (DDPM schedule) on freshly drawn
   scenes, holding out some (colour, shape) pairings for evaluation.
3. :func:`as_pipeline` wraps the trained model into a :class:`~contrastgen.methods.conform.ConformPipeline`
   (an identity "VAE": the model denoises pixels), which generates held-out prompts with and without CONFORM.
4. :func:`detect_objects` scores each image with a detector on the rendered shapes: per colour, the pixels close
   to that colour; the shape of each blob from its fill ratio of the bounding box.  Object presence: both
   prompted colours present; binding: both present with the prompted shape each.

Every piece is a function so other demos can reuse the model, renderer and detector (the contrastive
image-to-image editing demo edits an attribute of a drawn scene with the same tiny trained model).
Results (PNG grids, attention overlays, JSON with the measured rates and times) go to
``benches/results/demo_conform/`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.95), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
WORDS = ("a", "and") + tuple(COLORS) + SHAPES


# ----------------------------------------------------------------------------------------------- tokenizers
def _bpe_segment(word: str, ranks: Dict[Tuple[str, str], int]) -> List[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
        r, k = min(pairs)
        if r == 1 << 30:
            break
        parts = parts[:k] + [parts[k] + parts[k + 1]] + parts[k + 2:]
    return parts


def word_tokenizer(words: Sequence[str], model_max_length: int = 77):
    """An in-memory ``CLIPTokenizer`` for which each of ``words`` is a single token (any other text falls back to
    characters): byte-level characters, their ``</w>`` forms, and BPE merges that build every word."""
    from transformers import CLIPTokenizer

    vocab: Dict[str, int] = {}

    def add(t):
        vocab.setdefault(t, len(vocab))

    add("<|startoftext|>")
    add("<|endoftext|>")
    for c in [chr(i) for i in range(33, 127)]:
        add(c)
        add(c + "</w>")
    merges: List[Tuple[str, str]] = []
    ranks: Dict[Tuple[str, str], int] = {}
    for w in words:
        while True:
            parts = _bpe_segment(w, ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])       # lowest priority: applies after every earlier merge
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
        add(parts[0])
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def byte_level_tokenizer(model_max_length: int = 77):
    """The PLATFORM.md tokenizer: every printable character is one token (multi-token words everywhere)."""
    return word_tokenizer((), model_max_length)


# ---------------------------------------------------------------------------------- tiny Stable Diffusion
def tiny_stable_diffusion(seed: int = 0, tokenizer=None, pipeline_class=None):
    """The tiny offline Stable Diffusion of PLATFORM.md with random weights (UNet block_out_channels (32, 64),
    cross_attention_dim 32, sample_size 16 -> 32 x 32 images, cross-attention at 8 x 8; a 2-layer CLIPTextModel;
    a small AutoencoderKL; DDIMScheduler; no safety checker).  For tests of the pipeline mechanics."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .conform import ConformPipeline

    tokenizer = tokenizer or byte_level_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    cls = pipeline_class or ConformPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
