"""Generation fluency: greedy continuations of short prompts and their n-gram entropy (pure functions).

Meng et al. 2022 (ROME, "Generation fluency") measure how repetitive a model's text becomes after an edit by
the weighted average of the bi- and tri-gram entropies of generated text: for each n, the entropy
H_n = −Σ_g f(g)·log2 f(g) of the frequency distribution f of the text's n-grams g, combined with weights 2/3
(bigrams) and 4/3 (trigrams), i.e. (2/3·H_2 + 4/3·H_3)/2 = (H_2 + 2·H_3)/3, and averaged over the generated
texts. Lower means more repetition ("Paris Paris Paris ..." has H ≈ 0). Texts are split into words and
punctuation marks (``\\w+`` runs and single other non-space characters, close to a word tokenizer); token
lists (e.g. token ids) are used as given.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Sequence, Union

import torch

from ..errors import ConfigError, UnsupportedArchitectureError
from ..models.forward_args import cache_keyword, keeps_last_logits
from ..models.prompts import encode_prompt_only
from ..models.row_changes import rows_carry

if TYPE_CHECKING:
    from ..models.model import KnModel

Tokens = Sequence[Hashable]
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Words and punctuation marks of ``text``, in order."""
    return _WORD.findall(text)


def ngram_entropy_one(tokens: Union[str, Tokens], n: int) -> float:
    """Entropy in bits of the frequency distribution of the n-grams of one text (0 without any n-gram)."""
    if isinstance(tokens, str):
        tokens = words(tokens)
    tokens = list(tokens)
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_entropy(tokens: Union[str, Tokens], ns: Sequence[int] = (2, 3),
                 weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Σ_n w_n·H_n / Σ_n w_n for one text (texts are split by :func:`words`)."""
    if len(ns) != len(weights) or not ns:
        raise ConfigError(f"ns and weights need the same, non-zero length; got {list(ns)} and {list(weights)}")
    if any(n < 1 for n in ns) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"ns must be >= 1 and weights >= 0 with a positive sum; got {list(ns)} and {list(weights)}")
    if isinstance(tokens, str):
        tokens = words(tokens)
    return sum(w * ngram_entropy_one(tokens, n) for n, w in zip(ns, weights)) / sum(weights)


def ngram_entropy(texts: Sequence[Union[str, Tokens]], ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """The mean of :func:`text_entropy` over ``texts`` (strings or token lists): ROME's fluency measure."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ConfigError("ngram_entropy needs at least one text")
    return sum(text_entropy(t, ns, weights) for t in texts) / len(texts)


@dataclass(frozen=True)
class Generation:
    """A greedy continuation of ``prompt``: its tokens (up to, not including, the end-of-text token)."""

    prompt: str
    continuation: str
    token_ids: tuple[int, ...]

    @property
    def text(self) -> str:
        """Prompt and continuation: the text ROME scores."""
        return self.prompt + self.continuation


@torch.no_grad()
def greedy_generations(km: KnModel, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 16,
                       stop_at_eos: bool = True) -> list[Generation]:
    """Greedy (argmax) continuations of ``prompts``, ``max_new_tokens`` tokens at most each, in batches:
    prompts left-padded, positions counted from each prompt's first real token, a KV cache between steps.
    A prompt is encoded as for ``predict`` (special tokens, a ``[Y]`` slot cut, trailing spaces dropped); a
    continuation ends at the end-of-text token when ``stop_at_eos``. Causal language models only."""
    if km.is_masked_lm:
        raise UnsupportedArchitectureError(
            f"greedy generation needs a causal language model; {km.name} ({km.adapter.family}) is a masked LM")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    encoded = [encode_prompt_only(km.tokenizer, p, masked=False)[0] for p in prompts]
    out: list[Generation] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        for prompt, ids in zip(prompts[start : start + batch_size], _generate(km, chunk, max_new_tokens, stop_at_eos)):
            out.append(Generation(prompt, km.tokenizer.decode(ids), tuple(ids)))
    return out


@torch.no_grad()
def greedy_generations_changed(km: KnModel, prompt_groups: Sequence[Sequence[str]], plans: Sequence[Sequence],
                               max_new_tokens: int = 20, stop_at_eos: bool = True) -> list[list[Generation]]:
    """For each group, what :func:`greedy_generations` gives for its prompts with its weight change applied (plans
    from :func:`kn_edit.models.row_changes.row_change_plan`), every group in ONE batch, each row carrying its
    group's change: decoding reads every weight at every step, so many edited models cost about one."""
    if len(prompt_groups) != len(plans):
        raise ValueError("greedy_generations_changed: one plan per group of prompts")
    rows, start = [], 0
    for group in prompt_groups:
        rows.append(range(start, start + len(group)))
        start += len(group)
    with rows_carry(km, plans, rows):  # one chunk, so the rows stay where ``rows`` says
        return grouped_generations(km, prompt_groups, max_new_tokens, batch_size=max(start, 1),
                                   stop_at_eos=stop_at_eos)  # fmt: skip


def grouped_generations(km: KnModel, prompt_groups: Sequence[Sequence[str]], max_new_tokens: int = 20,
                        batch_size: int = 16, stop_at_eos: bool = True) -> list[list[Generation]]:
    """:func:`greedy_generations` of every group's prompts together (batched across groups), handed back per group."""
    made = greedy_generations(km, [p for g in prompt_groups for p in g], max_new_tokens, batch_size=batch_size,
                              stop_at_eos=stop_at_eos) if any(prompt_groups) else []  # fmt: skip
    out, start = [], 0
    for group in prompt_groups:
        out.append(made[start : start + len(group)])
        start += len(group)
    return out


def _generate(km: KnModel, sequences: Sequence[torch.Tensor], max_new_tokens: int,
              stop_at_eos: bool) -> list[list[int]]:
    """Greedy tokens [n][<= max_new_tokens] after each 1-D id tensor (left-padded into one batch)."""
    dev = km.device
    eos = km.tokenizer.eos_token_id if stop_at_eos else None
    pad = km.tokenizer.pad_token_id if km.tokenizer.pad_token_id is not None else (km.tokenizer.eos_token_id or 0)
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, longest - len(s):] = s
        mask[i, longest - len(s):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's first token at position 0
    done = torch.zeros(len(sequences), dtype=torch.bool, device=dev)
    tokens: list[torch.Tensor] = []
    key = cache_keyword(km.model) or "past_key_values"
    # Only the last position's logits are read: logits_to_keep spares the vocabulary projection of every prompt
    # token (a fifth of smollm2's compute per token, most of gemma3's with its 262k-word head).
    keep_last = {"logits_to_keep": 1} if keeps_last_logits(km.model) else {}
    out = km.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(dim=-1)  # [batch]
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        if eos is not None:
            done = done | (nxt == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = km.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                       **{key: getattr(out, key)})
    generated = torch.stack(tokens, dim=1).cpu().tolist()  # [batch, steps]
    result = []
    for row in generated:
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        result.append(row)
    return result
