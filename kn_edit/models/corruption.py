"""Corrupting a prompt's tokens as causal tracing does (Meng et al. 2022): Gaussian noise, a multiple of the
word embeddings' standard deviation, added to the embeddings of chosen token positions. Shared by causal
tracing (kn_edit.analysis.tracing) and subject finding (kn_edit.locating.subject)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .adapters import first_submodule

if TYPE_CHECKING:
    from .model import KnModel


def embeddings_module(km: KnModel) -> torch.nn.Module:
    return first_submodule(km.model, km.adapter.embeddings)


@torch.no_grad()
def embedding_std(km: KnModel, chunk: int = 8192) -> float:
    """Standard deviation of every entry of the embedding module's output over the whole vocabulary
    (so a scaled embedding, as Gemma's, is measured as the model sees it)."""
    emb = embeddings_module(km)
    vocab = emb.weight.shape[0]
    total = total_sq = 0.0
    count = 0
    for start in range(0, vocab, chunk):
        out = emb(torch.arange(start, min(vocab, start + chunk), device=km.device)).double()
        total += float(out.sum())
        total_sq += float((out * out).sum())
        count += out.numel()
    mean = total / count
    return float(max(total_sq / count - mean * mean, 0.0) ** 0.5)


def make_noise(km: KnModel, n_tokens: int, samples: int, scale: float, seed: int) -> tuple[torch.Tensor, float]:
    """([samples, n_tokens, d_model] seeded noise of ``scale`` × the embeddings' std, that std)."""
    std = embedding_std(km)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, km.d_model, generator=gen) * (scale * std), std
