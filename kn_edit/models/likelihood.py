"""The likelihood of plain text under a causal LM: the one token-NLL computation that the text-damage guard,
perplexity drift in evaluation and the benchmarks all use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from ..errors import KnEditError
from .prompts import encode_heads

if TYPE_CHECKING:
    from .model import KnModel


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM (summed next-token NLL, number of predicted tokens) of right-padded text.

    logits [batch, seq, vocab]; input_ids, attention_mask [batch, seq].
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"token_nll: logits [batch, seq, vocab] and ids/mask [batch, seq]; got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
        )
    pred = logits[:, :-1].float()
    gold = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), gold.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, (gold != -100).sum().float()


def tokenized_text(km: KnModel, passages: Sequence[str], max_tokens: int | None) -> list[torch.Tensor]:
    """Each passage's token ids [n] (special tokens included), cut at ``max_tokens``; passages of fewer than two
    tokens predict nothing and are left out."""
    if max_tokens is None:
        ids = [km.tokenizer(p, add_special_tokens=True)["input_ids"] for p in passages]
    else:  # tokenizes only each passage's head: bounded however long a passage is
        ids = encode_heads(km.tokenizer, list(passages), max_tokens, add_special_tokens=True)["input_ids"]
    return [torch.tensor(i, dtype=torch.long) for i in ids if len(i) >= 2]


@torch.no_grad()
def text_nll(km: KnModel, text: Sequence[torch.Tensor], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL, predicted tokens) of tokenized passages, ``batch_size`` at a time."""
    nll = torch.zeros((), device=km.device)
    count = torch.zeros((), device=km.device)
    for start in range(0, len(text), batch_size):
        ids, mask = km.pad(list(text[start : start + batch_size]))
        batch_nll, batch_count = token_nll(km.model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        nll, count = nll + batch_nll, count + batch_count
    return nll, count


def mean_text_nll(km: KnModel, texts: Sequence[str], max_tokens: int | None = None) -> float:
    """Mean per-token NLL of ``texts`` (each cut at ``max_tokens`` tokens), in one batch."""
    seqs = tokenized_text(km, texts, max_tokens)
    if not seqs:
        raise KnEditError("the text sample tokenizes to nothing (every passage has fewer than two tokens)")
    nll, count = text_nll(km, seqs, batch_size=len(seqs))
    return float(nll / count)


__all__ = ["mean_text_nll", "text_nll", "token_nll", "tokenized_text"]
