"""The prompt/answer convention, the same everywhere in kn-edit.

* Causal LM: the prompt is the text before the answer. A ParaRel-style pattern ending in ``[Y]`` (optionally
  followed by punctuation) is cut at the slot; ``[Y]`` anywhere else is an error, since a next-token
  prompt cannot see text after its answer.
* Masked LM: the prompt holds the tokenizer's mask token, or ``[Y]`` / ``[MASK]``, mapped to it.
* The target is the text that follows the prompt. When neither the prompt ends with nor the target starts
  with whitespace, one space is inserted, so ``Paris`` and `` Paris`` mean the same after
  ``The capital of France is``. Trailing whitespace of a causal prompt moves into the target (a BPE
  tokenizer would otherwise end the prompt on a lone space token).
* Multi-token targets are teacher-forced: answer token j is predicted at its own position with the gold
  tokens 0..j-1 in place (causal: appended; masked: j masks, the earlier ones filled in).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import PromptError, TargetError

SLOT_MARKERS = ("[Y]", "[MASK]")
# Prompts and targets longer than this many tokens are refused: kn-edit's methods run the model many times
# per prompt (integrated-gradient steps, solve steps), so a pasted document would run for hours.
DEFAULT_MAX_TOKENS = 512
_max_tokens: ContextVar[int] = ContextVar("kn_edit_max_tokens", default=DEFAULT_MAX_TOKENS)
_TRAILING_AFTER_SLOT = re.compile(r"^[\s\.\,\;\:\!\?\"\')]*$")
_BLOCK = 1 << 16  # characters normalized at a time


@dataclass(frozen=True)
class AnswerStep:
    """One answer token to predict: ``target_id`` at ``position`` of ``input_ids`` [seq]."""

    input_ids: torch.Tensor
    position: int
    target_id: int


@dataclass(frozen=True)
class EncodedFact:
    prompt: str
    target: str
    target_ids: tuple[int, ...]
    steps: tuple[AnswerStep, ...]


def join_target(prompt: str, target: str) -> tuple[str, str]:
    """(prompt, target) with the separating whitespace moved onto the target."""
    stripped = prompt.rstrip()
    trailing = prompt[len(stripped):]
    if trailing:
        return stripped, (trailing[-1] if not target[:1].isspace() else "") + target
    if target[:1].isspace():
        return prompt, target
    return prompt, " " + target


def normalize(text: str) -> str:
    """``" ".join(text.split())``, a block at a time: the list of a long text's words would cost some fifty bytes
    a word (gigabytes for a pasted book)."""
    pieces: list[str] = []
    space = False  # a space is due before the next word
    for start in range(0, len(text), _BLOCK):
        block = text[start : start + _BLOCK]
        words = " ".join(block.split())
        if not words:
            space = space or bool(pieces)
            continue
        if pieces and (space or block[0].isspace()):
            pieces.append(" ")
        pieces.append(words)
        space = block[-1].isspace()
    return "".join(pieces)


def check_text(prompt: str, target: str | None) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("empty prompt: give the text that precedes the answer")
    if target is not None and (not isinstance(target, str) or not target.strip()):
        raise TargetError(f"empty target for prompt {prompt!r}")


def causal_prompt(prompt: str) -> str:
    """Cut a pattern at its answer slot; reject slots that are followed by text."""
    for marker in SLOT_MARKERS:
        if marker in prompt:
            head, _, tail = prompt.partition(marker)
            if not _TRAILING_AFTER_SLOT.match(tail) or marker in tail:
                raise PromptError(
                    f"prompt {prompt!r} has its answer slot {marker} before other text; a causal language model "
                    "predicts the next token, so its prompts must end at the answer"
                )
            if not head.strip():
                raise PromptError(f"prompt {prompt!r} has no text before its answer slot")
            return head
    return prompt


def max_tokens() -> int:
    """The longest prompt or target (in tokens) accepted now; see :func:`token_limit`."""
    return _max_tokens.get()


@contextmanager
def token_limit(n: int) -> Iterator[None]:
    """Accept prompts and targets of up to ``n`` tokens within the block (default DEFAULT_MAX_TOKENS)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PromptError(f"the token limit must be a positive integer, got {n!r}")
    token = _max_tokens.set(n)
    try:
        yield
    finally:
        _max_tokens.reset(token)


def context_length(model) -> int | None:
    """The longest input (tokens) ``model`` (a Hugging Face model) was built for, where its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


# ----- cutting by characters before tokenizing -------------------------------------------------------------------
# A token stands for at most as many characters as its vocabulary string has (a byte-level token's string has one
# character per byte, a SentencePiece one marks its space with one), so n tokens span at most n × the longest
# vocabulary string. A text's head of twice that many characters therefore holds its first n tokens well inside it,
# and a text of at most n tokens is never cut. The exceptions, tokenizers that let one token stand for more (WordPiece
# drops runs of spaces and gives a whole long word one unknown token), show as a head with too few tokens
# (:func:`head_holds`): those texts are tokenized whole where the whole text is at hand.
def _longest_token(tokenizer) -> int | None:
    """The longest vocabulary string of ``tokenizer`` in characters (None where it lists no vocabulary); kept on
    the tokenizer (no module-level cache) while its vocabulary keeps its size (tokens added later count)."""
    try:
        size = len(tokenizer)
    except TypeError:  # no size: computed each time
        size = None
    cached = getattr(tokenizer, "__dict__", {}).get("_kn_edit_longest_token")
    if cached is not None and size is not None and cached[0] == size:
        return cached[1]
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=0) or None
    except (AttributeError, NotImplementedError, TypeError):
        longest = None
    if size is not None and hasattr(tokenizer, "__dict__"):
        tokenizer.__dict__["_kn_edit_longest_token"] = (size, longest)
    return longest


def head_chars(tokenizer, n_tokens: int) -> int | None:
    """How many characters of a text to tokenize for its first ``n_tokens`` tokens (see above); None: all."""
    longest = _longest_token(tokenizer)
    return None if longest is None else 2 * max(n_tokens, 1) * longest


def text_head(tokenizer, text: str, n_tokens: int) -> str:
    """``text`` cut to :func:`head_chars` characters (the same object when it is not longer)."""
    bound = head_chars(tokenizer, n_tokens)
    return text if bound is None or len(text) <= bound else text[:bound]


def head_holds(ids: Sequence[int], n_tokens: int) -> bool:
    """Whether a cut text's token ids (``ids``) hold its first ``n_tokens`` tokens: more than n + 1 of them, so that
    neither the token cut at the end nor a closing special token is among the first n."""
    return len(ids) > n_tokens + 1


def encode_heads(tokenizer, texts: Sequence[str], n_tokens: int, **kwargs) -> dict[str, list]:
    """``tokenizer(texts, **kwargs)`` with every field (input_ids, offset_mapping, ...) cut to each text's first
    ``n_tokens`` tokens, exactly as tokenizing the texts whole would give, while tokenizing only each text's head
    (:func:`text_head`): memory and time stay bounded however long a text. A head that does not hold enough
    tokens (:func:`head_holds`) is tokenized whole instead."""
    if not texts:  # (tokenizers fail on an empty batch)
        return {"input_ids": []}
    heads = [text_head(tokenizer, t, n_tokens) for t in texts]
    out = {key: list(value) for key, value in tokenizer(heads, **kwargs).items()}
    for i, (text, head) in enumerate(zip(texts, heads)):
        if head is not text and not head_holds(out["input_ids"][i], n_tokens):
            whole = tokenizer(text, **kwargs)
            for key in out:
                out[key][i] = whole[key]
    return {key: [list(row)[:n_tokens] for row in rows] for key, rows in out.items()}


def _too_long(kind: str, text: str, n: int, limit: int, at_least: bool = False) -> str:
    how = "raise the limit with --max-tokens N (command line) or kn_edit.token_limit(N) (Python)"
    return f"{kind} {_short(text)} is {'over ' if at_least else ''}{n} tokens long, above the limit of {limit}; {how}"


def check_head(tokenizer, text: str, kind: str = "prompt") -> None:
    """PromptError (``kind`` prompt) or TargetError (target) when the head of ``text`` (:func:`text_head`) alone
    is above the token limit: a pasted document is refused after tokenizing a few pages, not all of it."""
    limit = max_tokens()
    head = text_head(tokenizer, text, limit)
    if head is not text:
        ids = _tokenize(tokenizer, head, special=False)
        if head_holds(ids, limit):
            error = TargetError if kind == "target" else PromptError
            raise error(_too_long(kind, text, len(ids) - 1, limit, at_least=True))


def check_length(prompt: str, n_prompt: int, target: str | None = None, n_target: int = 0,
                 context: int | None = None, total: int | None = None) -> None:
    """PromptError / TargetError where the prompt or target exceeds the token limit, or the model's input
    (``total`` tokens, default prompt + target) its context."""
    limit = max_tokens()
    if n_prompt > limit:
        raise PromptError(_too_long("prompt", prompt, n_prompt, limit))
    if target is not None and n_target > limit:
        raise TargetError(_too_long("target", target, n_target, limit))
    total = n_prompt + n_target if total is None else total
    if context is not None and total > context:
        raise PromptError(f"prompt {_short(prompt)} with its target is {total} tokens long, more than "
                          f"the model's context of {context} tokens")


def _tokenize(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as they follow ``prompt`` (tokenizing the joined text where it splits cleanly)."""
    prompt_ids = _tokenize(tokenizer, prompt, special=False)
    full_ids = _tokenize(tokenizer, prompt + target, special=False)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        ids = full_ids[len(prompt_ids):]
    else:
        ids = _tokenize(tokenizer, target, special=False)
    if not ids:
        raise TargetError(f"target {target!r} tokenizes to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise TargetError(
            f"the tokenizer cannot express target {target!r}: it becomes the unknown token "
            f"({tokenizer.convert_ids_to_tokens(ids)})"
        )
    return ids


def encode_causal(tokenizer, prompt: str, target: str, context: int | None = None) -> EncodedFact:
    check_text(prompt, target)
    check_head(tokenizer, prompt)
    check_head(tokenizer, target, "target")
    prompt, target = join_target(causal_prompt(prompt), target)
    target_ids = _target_ids(tokenizer, prompt, target)
    prompt_ids = _tokenize(tokenizer, prompt, special=True)
    if not prompt_ids:
        raise PromptError(f"prompt {prompt!r} tokenizes to nothing")
    check_length(prompt, len(prompt_ids), target, len(target_ids), context)
    full = torch.tensor(prompt_ids + target_ids, dtype=torch.long)
    steps = tuple(
        AnswerStep(input_ids=full[: len(prompt_ids) + j], position=len(prompt_ids) + j - 1, target_id=tid)
        for j, tid in enumerate(target_ids)
    )
    return EncodedFact(prompt=prompt, target=target, target_ids=tuple(target_ids), steps=steps)


def masked_prompt(tokenizer, prompt: str) -> str:
    mask = tokenizer.mask_token
    if mask is None:
        raise PromptError("this masked language model's tokenizer has no mask token")
    for marker in SLOT_MARKERS:
        prompt = prompt.replace(marker, mask)
    count = prompt.count(mask)
    if count != 1:
        raise PromptError(
            f"a masked-LM prompt needs exactly one answer slot ({mask}, [Y] or [MASK]); {prompt!r} has {count}"
        )
    return prompt


def encode_masked(tokenizer, prompt: str, target: str, context: int | None = None) -> EncodedFact:
    check_text(prompt, target)
    check_head(tokenizer, prompt)
    check_head(tokenizer, target, "target")
    prompt = masked_prompt(tokenizer, prompt)
    target_ids = _tokenize(tokenizer, target.strip(), special=False)
    if not target_ids:
        raise TargetError(f"target {target!r} tokenizes to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids:
        raise TargetError(f"the tokenizer cannot express target {target!r}: it becomes the unknown token")
    ids = _tokenize(tokenizer, prompt, special=True)
    check_length(prompt, len(ids), target, len(target_ids), context, total=len(ids) + len(target_ids) - 1)
    slot = ids.index(tokenizer.mask_token_id)
    n = len(target_ids)
    steps = []
    for j, tid in enumerate(target_ids):
        # Teacher forcing: gold tokens before j, masks from j on.
        filled = ids[:slot] + target_ids[:j] + [tokenizer.mask_token_id] * (n - j) + ids[slot + 1:]
        steps.append(AnswerStep(torch.tensor(filled, dtype=torch.long), slot + j, tid))
    return EncodedFact(prompt=prompt, target=target.strip(), target_ids=tuple(target_ids), steps=tuple(steps))


def encode_prompt_only(tokenizer, prompt: str, masked: bool, context: int | None = None) -> tuple[torch.Tensor, int]:
    """(input_ids [seq], answer position) for a prompt without a target, as used by predict()."""
    check_text(prompt, None)
    check_head(tokenizer, prompt)
    if masked:
        prompt = masked_prompt(tokenizer, prompt)
        ids = _tokenize(tokenizer, prompt, special=True)
        check_length(prompt, len(ids), context=context)
        return torch.tensor(ids, dtype=torch.long), ids.index(tokenizer.mask_token_id)
    prompt = causal_prompt(prompt).rstrip()
    ids = _tokenize(tokenizer, prompt, special=True)
    if not ids:
        raise PromptError(f"prompt {prompt!r} tokenizes to nothing")
    check_length(prompt, len(ids), context=context)
    return torch.tensor(ids, dtype=torch.long), len(ids) - 1
