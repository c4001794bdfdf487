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
from dataclasses import dataclass

import torch

from .errors import PromptError, TargetError

SLOT_MARKERS = ("[Y]", "[MASK]")
_TRAILING_AFTER_SLOT = re.compile(r"^[\s\.\,\;\:\!\?\"\')]*$")


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


def encode_causal(tokenizer, prompt: str, target: str) -> EncodedFact:
    check_text(prompt, target)
    prompt, target = join_target(causal_prompt(prompt), target)
    target_ids = _target_ids(tokenizer, prompt, target)
    prompt_ids = _tokenize(tokenizer, prompt, special=True)
    if not prompt_ids:
        raise PromptError(f"prompt {prompt!r} tokenizes to nothing")
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


def encode_masked(tokenizer, prompt: str, target: str) -> EncodedFact:
    check_text(prompt, target)
    prompt = masked_prompt(tokenizer, prompt)
    target_ids = _tokenize(tokenizer, target.strip(), special=False)
    if not target_ids:
        raise TargetError(f"target {target!r} tokenizes to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids:
        raise TargetError(f"the tokenizer cannot express target {target!r}: it becomes the unknown token")
    ids = _tokenize(tokenizer, prompt, special=True)
    slot = ids.index(tokenizer.mask_token_id)
    n = len(target_ids)
    steps = []
    for j, tid in enumerate(target_ids):
        # Teacher forcing: gold tokens before j, masks from j on.
        filled = ids[:slot] + target_ids[:j] + [tokenizer.mask_token_id] * (n - j) + ids[slot + 1:]
        steps.append(AnswerStep(torch.tensor(filled, dtype=torch.long), slot + j, tid))
    return EncodedFact(prompt=prompt, target=target.strip(), target_ids=tuple(target_ids), steps=tuple(steps))


def encode_prompt_only(tokenizer, prompt: str, masked: bool) -> tuple[torch.Tensor, int]:
    """(input_ids [seq], answer position) for a prompt without a target, as used by predict()."""
    check_text(prompt, None)
    if masked:
        prompt = masked_prompt(tokenizer, prompt)
        ids = _tokenize(tokenizer, prompt, special=True)
        return torch.tensor(ids, dtype=torch.long), ids.index(tokenizer.mask_token_id)
    prompt = causal_prompt(prompt).rstrip()
    ids = _tokenize(tokenizer, prompt, special=True)
    if not ids:
        raise PromptError(f"prompt {prompt!r} tokenizes to nothing")
    return torch.tensor(ids, dtype=torch.long), len(ids) - 1
