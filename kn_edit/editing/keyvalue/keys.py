"""ROME's key k*: the input of layer l's value projection (the FFN's post-activation hidden) at the subject's
last token, averaged over the subject preceded by short context prefixes (Meng et al. 2022, eq. 3).

Context prefixes (the paper's "context templates"): ``n`` texts of ``length`` tokens sampled from the model
itself, starting from its BOS (or EOS) token, each next token drawn from the top-k of the text tokens (no
special or added control token: :func:`control_tokens`) with a seeded generator, plus the empty prefix. A prefix
is joined to a text as ``"{prefix}. {text}"``. They depend on the model only, not on the edit, so they are kept
on the model per sampling settings while its weights stay the same (kn_edit.editing.ledger.weights_state): an
evaluation that edits, measures and reverts fact after fact samples them once; an edit or a patch applied (or any
other write to the weights) samples them again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from ...errors import EditError
from ...models.hooks import run_until, value_input_hooks
from ...models.prompts import causal_prompt
from ..ledger import weights_state
from .settings import KeyFit
from .solve import exact_direction

if TYPE_CHECKING:
    from ...models.model import KnModel


# Where the model keeps its sampled prefixes: {(n, length, top_k, seed): (weights state, tokenizer, prefixes)}.
_PREFIXES_ATTR = "_kn_edit_context_prefixes"


def context_prefixes(km: KnModel, n: int, length: int, top_k: int = 5, seed: int = 0) -> list[str]:
    """``[""]`` followed by ``n`` short texts sampled from the model, sampled again only when the weights (or the
    tokenizer) changed since the last time (see the module docstring)."""
    if n == 0:
        return [""]
    held = km.model.__dict__.setdefault(_PREFIXES_ATTR, {})
    state, found = weights_state(km), held.get((n, length, top_k, seed))
    if found is not None and found[1] is km.tokenizer and found[0] == state:
        return list(found[2])
    prefixes = sample_prefixes(km, n, length, top_k, seed)
    held[(n, length, top_k, seed)] = (state, km.tokenizer, tuple(prefixes))
    return prefixes


@torch.no_grad()
def sample_prefixes(km: KnModel, n: int, length: int, top_k: int = 5, seed: int = 0) -> list[str]:
    """``[""]`` followed by ``n`` short texts sampled from the model now (see the module docstring)."""
    tok = km.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise EditError("the tokenizer has neither a BOS nor an EOS token to sample context prefixes from")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), int(start), dtype=torch.long)
    banned = None
    for _ in range(length):
        logits = km.model(input_ids=ids.to(km.device)).logits[:, -1].float().cpu()  # [n, vocab]
        if banned is None:
            banned = control_tokens(tok, logits.shape[-1])
        logits[:, banned] = -math.inf
        top = logits.topk(min(top_k, logits.shape[-1]))
        pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)  # [n, 1]
        ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
    texts = [" ".join(tok.decode(row[1:], skip_special_tokens=True).split()) for row in ids]
    return [""] + texts


def control_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """Ids [k] a context prefix may not contain: the special tokens, every added token that is not whitespace
    (Gemma 3's ``<start_of_image>`` is added but not marked special: sampled after its BOS, it went into prefixes
    as text, and encoding the prefixed prompt turned it back into the image token), and the ids past the
    tokenizer's vocabulary (the head's padding rows, which decode to nothing)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids |= {int(i) for i, token in added.items() if str(getattr(token, "content", token)).strip()}
    ids |= set(range(len(tokenizer), vocab))
    return torch.tensor(sorted(i for i in ids if 0 <= i < vocab), dtype=torch.long)


def with_prefix(prefix: str, text: str) -> str:
    return f"{prefix}. {text}" if prefix else text


def subject_end(prompt: str, subject: str) -> int:
    """Character offset just after the subject's last occurrence in ``prompt`` (exact, else ignoring case)."""
    if not isinstance(subject, str) or not subject.strip():
        raise EditError("ROME needs the request's subject (the key is read at its last token); give subject=...")
    subject = subject.strip()
    at = prompt.rfind(subject)
    if at < 0:
        at = prompt.lower().rfind(subject.lower())
    if at < 0:
        raise EditError(f"the subject {subject!r} does not occur in prompt {prompt!r}; ROME reads the key at the "
                        "subject's last token, so every prompt must contain it")
    return at + len(subject)


def token_at(tokenizer, text: str, char_end: int) -> tuple[list[int], int]:
    """(ids of ``text`` with special tokens, index of the token holding character ``char_end - 1``)."""
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        head = list(tokenizer(text[:char_end], add_special_tokens=True)["input_ids"])
        return ids, len(head) - 1
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    last = char_end - 1
    for j, (a, b) in enumerate(offsets):
        if a <= last < b:
            return ids, j
    raise EditError(f"cannot find the token of character {last} of {text!r}")  # pragma: no cover


@dataclass(frozen=True)
class SubjectText:
    """A text and the position of the subject's last token in its ids."""

    input_ids: torch.Tensor  # [seq]
    position: int


def subject_texts(km: KnModel, subject: str, prompts: Sequence[str], prefixes: Sequence[str], whole_subject: bool) -> list[SubjectText]:
    """Texts k* is averaged over: each prefix followed by the subject (``whole_subject``) or by each prompt cut
    just after the subject."""
    out = []
    heads = [subject.strip()] if whole_subject else [p[: subject_end(p, subject)] for p in prompts]
    for head in heads:
        for prefix in prefixes:
            text = with_prefix(prefix, head)
            ids, pos = token_at(km.tokenizer, text, len(text))
            out.append(SubjectText(torch.tensor(ids, dtype=torch.long), pos))
    return out


def prompt_text(prompt: str) -> str:
    """The prompt as kn-edit's encoding sees it (cut at a ``[Y]`` slot, trailing whitespace off)."""
    return causal_prompt(prompt).rstrip()


@torch.no_grad()
def keys_at(km: KnModel, layer: int, texts: Sequence[SubjectText], batch_size: int = 32) -> torch.Tensor:
    """[n, d_ff] float32 CPU: layer's value-projection input at each text's position."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids, mask = km.pad([t.input_ids for t in chunk])
        rows = torch.arange(len(chunk), device=km.device)
        pos = torch.tensor([t.position for t in chunk], device=km.device)
        got: dict[int, torch.Tensor] = {}

        def capture(_layer: int, act: torch.Tensor) -> None:
            got["k"] = act[rows, pos].float().cpu()

        with value_input_hooks({layer: km.value_proj(layer)}, capture):
            run_until(km.model, km.value_proj(layer), input_ids=ids, attention_mask=mask)
        out.append(got["k"])
    return torch.cat(out)


def check_causal_requests(km: KnModel, requests, method: str, why: str = "the key is read at the subject's last token") -> None:
    """What every key-value editor needs before computing anything: a causal LM (the subject comes before the
    answer), and a subject in every request that every one of its prompts contains."""
    if km.is_masked_lm:
        raise EditError(f"{method} edits causal language models ({why} before the answer); this is a masked "
                        "language model")
    check_subjects(requests, method, why)


def check_subjects(requests, method: str, why: str = "the key is read at the subject's last token") -> None:
    """Every request has a subject and every prompt contains it (checked before anything is computed)."""
    for request in requests:
        if not request.subject or not request.subject.strip():
            raise EditError(f"{method} needs the subject of request {request.old!r} → {request.new!r} (subject=..., "
                            f"--subject): {why}")
        for prompt in request.prompts:
            subject_end(prompt_text(prompt), request.subject)


def start_text(km: KnModel, subject: str) -> SubjectText | None:
    """The subject alone at the start of a text (after the BOS token where the tokenizer adds one, as it does for
    every prompt). Causal attention at the subject's last token sees only the subject there, so this one key is
    the key of every prompt that begins with the subject ("Danielle Darrieux's mother tongue is"), a key neither
    k* (the subject after context prefixes) nor an edit prompt with the subject inside gives.

    None where the subject's last token is the text's first (a one-token subject, no BOS token): that position is
    the attention sink, whose key is nearly every text's first key whatever its token (smollm2-135m, layer 5:
    cosine 0.93-0.95 between "Japan", "Italy", "France", 0.89 with "The"), so moving it moves every text
    (+0.15 nats per token of general text for France → Rome) and not the subject's prompts."""
    text = subject_texts(km, subject, [], [""], whole_subject=True)[0]
    return text if text.position > 0 else None


# The start key is left out where it makes the least-change update more than this many times as large in C's norm
# (√wᵀCw of the exact direction, kn_edit/editing/rome/update.py): a start key far shorter than k* (smollm2-135m,
# "Milwaukee County": ‖k‖ 0.89 against 4.9, cosine 0.2) needs a direction 6.6 times as large, which moved the
# text by +6 % and other subjects' answers; where it reached a paraphrase the factor was 1.06.
START_COST = 1.5


def fitted_keys(km: KnModel, layer: int, key: torch.Tensor, subject: str, prompts: Sequence[str], prefixes: Sequence[str],
                fit: KeyFit, subject_start: bool = False, mom2: torch.Tensor | None = None,
                factors: dict | None = None) -> torch.Tensor:
    """[m, d_ff]: the keys an update gives the whole shift δ (kn_edit/editing/rome/update.py): k* [d_ff], with
    ``fit`` prompts / rows also each edit prompt's own key (no prefix / after every prefix), and with
    ``subject_start`` last the key of the subject at the start of a text (:func:`start_text`; not at position 0,
    and given ``mom2`` (C of the layer, ``factors`` its memo) not where it costs more than START_COST)."""
    texts = []
    if fit != KeyFit.mean:
        texts += subject_texts(km, subject, [prompt_text(p) for p in prompts], prefixes if fit == KeyFit.rows else [""],
                               whole_subject=False)
    start = start_text(km, subject) if subject_start else None
    if start is not None:
        texts.append(start)
    keys = torch.cat([key[None], keys_at(km, layer, texts)]) if texts else key[None]
    if start is not None and mom2 is not None and start_cost(mom2, keys, factors) > START_COST:
        keys = keys[:-1]
    return keys


def start_cost(mom2: torch.Tensor, keys: torch.Tensor, factors: dict | None = None) -> float:
    """√(wᵀCw) of the exact least-change direction for ``keys`` [m, d_ff] over that for all but the last one;
    infinite where C does not measure it (singular, as the null-space option's statistics over a few texts may be),
    so that the start key is left out rather than its cost guessed."""

    def size(k: torch.Tensor) -> float:
        w = exact_direction(mom2, k, factors=factors)
        return float(w @ (mom2.to(torch.float64) @ w))

    try:
        with_start, without = size(keys), size(keys[:-1])
    except EditError:
        return math.inf
    if not (math.isfinite(with_start) and math.isfinite(without) and with_start > 0 and without > 0):
        return math.inf
    return (with_start / without) ** 0.5
