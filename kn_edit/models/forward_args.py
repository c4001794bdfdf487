"""What a model's forward takes, read from its signature once per call site: transformers renamed the KV-cache
argument (``cache`` in 5.x, ``past_key_values`` before) and not every head takes ``logits_to_keep``."""

from __future__ import annotations

import inspect

import torch


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The forward argument that takes a KV cache: ``cache`` (transformers 5) or ``past_key_values``; None where
    the forward takes neither."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def keeps_last_logits(model: torch.nn.Module) -> bool:
    """Whether the forward takes ``logits_to_keep`` (then ``logits_to_keep=1`` computes the last position's logits
    only, sparing the vocabulary projection of every other position)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


__all__ = ["cache_keyword", "keeps_last_logits"]
