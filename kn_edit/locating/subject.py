"""Find a fact's subject in its prompts, for the editors that read a key at the subject's last token (kn-subject,
ROME, MEMIT) when the user gives none.

1. Candidates: spans of whole words of the first prompt that occur, as whole words, in every prompt; a span may
   not begin or end with a function word ("the", "of", "is", ...), and "'s" is not part of a word ("Japan's
   capital" → "Japan"). With one prompt every such span is a candidate; with paraphrases the relation's words
   mostly drop out, since they differ between the prompts. A capitalised "The" before a capitalised word may
   begin a span ("The Beatles"; Known 1000 spells such subjects with their "The"), and so may any capitalised
   function word inside the prompt ("The language of Their Satanic Majesties Request was").
2. Score (causal tracing's first step, Meng et al. 2022): how much P(old) falls, on average over the prompts,
   when Gaussian noise (``noise_scale`` × the embeddings' std) is added to the embeddings of the span's tokens
   (every occurrence of it). The subject is what decides which object the prompt asks for.
3. Choice (``RULES``; ``kn-edit find-subject --facts pararel|known1000`` measures them): ``proper`` (default)
   takes the whole proper-noun phrase (every word capitalised or a number, at least one capital; function words
   and name particles such as "de" allowed inside) with the lowercase nouns that follow it up to the relation
   ("Lumia series", "Sialkot district": words that do not look like verbs, after spaces only, so never "Japan's
   capital"); without one, the longest candidate; on a tie, the first in the prompt. ``proper-drop`` breaks the
   tie by the largest drop instead, ``drop`` takes the largest drop outright. Measured on smollm2-135m, the
   corruption score decides badly: it prefers the relation's words ("part" in "intron is part of", a year in
   "X, created in 1891"), so the default uses the prompt's structure alone and runs no forward pass. A span
   never holds a lowercase clause word ("is", "was", "which", ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import EditError
from ..models.corruption import embeddings_module, make_noise

if TYPE_CHECKING:
    from ..models.model import KnModel

WORD = re.compile(r"\w+(?:[-'’.&]\w+)*")
POSSESSIVE = re.compile(r"['’]s$", re.IGNORECASE)
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been being has have had do does did "
    "which who whom whose that this these those it its his her their they he she as into about after before "
    "during between under over than then there here what when where while also not no can could will would "
    "shall should may might must so one called named known up out off".split()
)
# never inside a subject: a span holding one of these runs into the relation ("intron is part" → "intron")
CLAUSE_WORDS = frozenset("is are was were be been being has have had do does did which who whom whose that".split())
# lowercase name particles, allowed inside a proper-noun phrase ("Pedro de Ribera", "Ludwig van Beethoven")
PARTICLES = frozenset("de da di du des del della der den van von la le las los bin ibn al y dos das".split())
# irregular past tenses that may follow a subject (regular ones end in -ed)
IRREGULAR = frozenset("took made became went got gave held led won left lost met ran saw wrote spoke grew began sang "
                      "fell fought found built bought sold taught brought kept became".split())
RULES = ("proper", "proper-drop", "drop", "shared", "capital")
MAX_WORDS = 8


@dataclass(frozen=True)
class Candidate:
    text: str
    words: int
    proper: bool  # every word capitalised or a number (function words allowed inside)
    possessive: bool = False  # its last word is followed by "'s" in the prompt (no name goes on past it)


@dataclass
class SubjectGuess:
    """The subject chosen, in how many prompts it occurs, and every candidate's score (P(old) drop)."""

    subject: str
    found_in: int
    prompts: int
    rule: str
    scores: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return f"subject: {self.subject!r} (found in {self.found_in}/{self.prompts} prompts)"


def _words(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the words of ``text``, a possessive "'s" cut off."""
    out = []
    for m in WORD.finditer(text):
        start, end = m.span()
        cut = POSSESSIVE.search(m.group())
        if cut and end - start > 2:
            end -= 2
        elif "." in m.group() and text[end : end + 1] == ".":  # an abbreviation keeps its last dot: "F.C.", "D.C."
            end += 1
        out.append((start, end))
    return out


def _is_function(word: str) -> bool:
    return word.lower() in FUNCTION_WORDS


def _is_proper(words: Sequence[str]) -> bool:
    """Every word a name's ("Paris", "iPhone", "d'Ennery", "5" in "iPhone 5"), function words and particles allowed
    inside; at least one word with a capital (a year alone is no name)."""
    inner = [w for w in words if not _is_function(w) and w.lower() not in PARTICLES]
    capital = [any(ch.isupper() for ch in w) for w in inner]
    return any(capital) and all(c or w[:1].isdigit() for w, c in zip(inner, capital))


def _noun_like(word: str) -> bool:
    """A lowercase word that may end a name ("series", "district", "team"), not a verb that may follow the
    subject ("plays", "passed", "belongs", "meaning")."""
    w = word.lower()
    verb = w.endswith(("ed", "ing", "ly")) or w in IRREGULAR or \
        (w.endswith("s") and not w.endswith(("ss", "us", "is", "ics")) and w not in ("series", "species"))  # fmt: skip
    return word[:1].islower() and w not in FUNCTION_WORDS and w not in CLAUSE_WORDS and not verb


TAIL = re.compile(r"(?:[ \t]+[^\W\d_][\w-]*)+")


def occurrences(text: str, span: str) -> list[tuple[int, int]]:
    """Character spans of ``span`` in ``text`` as whole words (not inside a longer word)."""
    pattern = re.compile(r"(?<!\w)" + re.escape(span) + r"(?!\w)")
    return [m.span() for m in pattern.finditer(text)]


def candidates(prompts: Sequence[str], max_words: int = MAX_WORDS) -> list[Candidate]:
    """The word spans of the first prompt that every prompt contains as whole words, without a function word at
    either edge, in order of first appearance (see the module docstring)."""
    if not prompts:
        return []
    first = prompts[0]
    words = _words(first)
    seen: dict[str, Candidate] = {}
    for i in range(len(words)):
        for j in range(i, min(len(words), i + max_words)):
            texts = [first[a:b] for a, b in words[i : j + 1]]
            if any(w in CLAUSE_WORDS for w in texts):  # lowercase: "The Man Who Planted Trees" keeps its "Who"
                break
            # a capitalised function word before a name may lead it: "The Beatles", "... of Their Satanic ..."
            leads = texts[0][:1].isupper() and (texts[0] == "The" or words[i][0] > 0) and len(texts) > 1 and \
                _is_proper(texts[1:2])  # fmt: skip
            if (_is_function(texts[0]) and not leads) or _is_function(texts[-1]):
                continue
            span = first[words[i][0] : words[j][1]]
            if span in seen or not all(occurrences(p, span) for p in prompts):
                continue
            seen[span] = Candidate(span, j - i + 1, _is_proper(texts), bool(POSSESSIVE.match(first[words[j][1]:][:2])))
    return list(seen.values())


def _token_ranges(km: KnModel, text: str, n_ids: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Token positions (of ``text`` encoded with special tokens) that overlap any of the character ``spans``."""
    tok = km.tokenizer
    hit: set[int] = set()
    if getattr(tok, "is_fast", False):
        offsets = tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"][:n_ids]
        for a, b in spans:
            hit |= {i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a}
        return sorted(hit)
    for a, b in spans:  # slow tokenizers: token counts of the text up to the span's start and end
        start = len(tok(text[:a].rstrip(), add_special_tokens=True)["input_ids"]) if text[:a].strip() else \
            len(tok("", add_special_tokens=True)["input_ids"])  # fmt: skip
        stop = len(tok(text[:b], add_special_tokens=True)["input_ids"])
        hit |= set(range(start, min(stop, n_ids)))
    return sorted(hit)


def _target_probs(km: KnModel, emb: torch.nn.Module, ids: torch.Tensor, add: torch.Tensor, target_id: int) -> torch.Tensor:
    """[rows]: P(target_id) at the last position of ``ids`` with ``add`` [rows, seq, d_model] added to the
    embeddings' output."""

    def corrupt(_m, _args, output):
        return output + add.to(output.device, output.dtype)

    handle = emb.register_forward_hook(corrupt)
    try:
        logits = km.model(input_ids=ids[None].expand(len(add), -1).to(km.device), use_cache=False).logits
    finally:
        handle.remove()
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, target_id].cpu()


@torch.no_grad()
def corruption_drops(km: KnModel, prompts: Sequence[str], target: str, spans: Sequence[str], samples: int = 3,
                     noise_scale: float = 3.0, seed: int = 0, batch_rows: int = 64) -> torch.Tensor:
    """[n_spans]: mean over ``prompts`` of P(target's first token | prompt) minus its mean over ``samples`` noise
    draws with every occurrence of the span's tokens corrupted (the same draws for every span of a prompt)."""
    drops = torch.zeros(len(spans))
    emb = embeddings_module(km)
    for prompt in prompts:
        enc = km.encode(prompt, target)
        step = enc.steps[0]
        ids = step.input_ids[: step.position + 1]
        masks = torch.zeros(len(spans), len(ids))
        for c, span in enumerate(spans):
            masks[c, _token_ranges(km, enc.prompt, len(ids), occurrences(enc.prompt, span))] = 1.0
        noise, _ = make_noise(km, len(ids), samples, noise_scale, seed)
        rows = [(c, s) for c in range(len(spans)) for s in range(samples)]
        clean = float(_target_probs(km, emb, ids, torch.zeros(1, len(ids), km.d_model), step.target_id)[0])
        probs = []
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start : start + batch_rows]
            add = torch.stack([noise[s] * masks[c][:, None] for c, s in chunk])
            probs.append(_target_probs(km, emb, ids, add, step.target_id))
        if rows:
            drops += clean - torch.cat(probs).view(len(spans), samples).mean(dim=1)
    return drops / max(len(prompts), 1)


def proper_phrases(cands: Sequence[Candidate]) -> list[Candidate]:
    """The proper-noun candidates no other proper-noun candidate contains (whole phrases: "Albert Einstein")."""
    proper = [c for c in cands if c.proper]
    return [c for c in proper if not any(o is not c and occurrences(o.text, c.text) for o in proper)]


def needs_scores(cands: Sequence[Candidate], rule: str = "proper") -> bool:
    """Whether ``rule`` needs the corruption scores to choose among ``cands``."""
    if rule == "drop":
        return len(cands) > 1
    if rule != "proper-drop":
        return False
    phrases = proper_phrases(cands)
    if phrases:
        return len(phrases) > 1
    longest = max(c.words for c in cands)
    return sum(c.words == longest for c in cands) > 1


def choose(cands: Sequence[Candidate], drops: Sequence[float] | None, rule: str = "proper") -> Candidate:
    """The candidate ``rule`` picks (see the module docstring); ``drops``: each candidate's P(old) drop (needed
    where :func:`needs_scores`)."""
    if rule not in RULES:
        raise ValueError(f"unknown subject rule {rule!r}: choose from {', '.join(RULES)}")
    if rule == "shared":  # the longest span every prompt shares, the first on a tie
        return max(cands, key=lambda c: c.words)
    if rule == "capital":  # the longest proper-noun span, else the longest span
        proper = [c for c in cands if c.proper]
        return max(proper or cands, key=lambda c: c.words)
    if needs_scores(cands, rule) and drops is None:
        raise ValueError(f"rule {rule!r} needs the candidates' corruption scores here")
    score = dict(zip((c.text for c in cands), drops)) if drops is not None else {}
    if rule == "drop":
        return max(cands, key=lambda c: score.get(c.text, 0.0))
    phrases = proper_phrases(cands)
    pool = phrases or [c for c in cands if c.words == max(x.words for x in cands)]
    # a tie: the first in the prompt (proper), or the largest drop (proper-drop); max keeps the first of equals
    chosen = max(pool, key=lambda c: score.get(c.text, 0.0)) if rule == "proper-drop" else pool[0]
    tails = [c for c in cands if c.text.startswith(chosen.text) and not c.possessive and _is_tail(c.text[len(chosen.text):])]
    return max([chosen] + tails, key=lambda c: c.words) if phrases else chosen


def _is_tail(rest: str) -> bool:
    """Lowercase nouns after a name, separated by spaces only: "Lumia| series", "Belize| national football team"."""
    return bool(TAIL.fullmatch(rest)) and all(_noun_like(w) for w in rest.split())


def find_subject(km: KnModel, prompts: Sequence[str], old: str, rule: str = "proper", samples: int = 3,
                 noise_scale: float = 3.0, seed: int = 0, score_all: bool = False) -> SubjectGuess:
    """The subject of the fact ``prompts`` complete with ``old`` (see the module docstring); an EditError when no
    span of whole words occurs in every prompt. ``score_all``: compute every candidate's corruption score even
    where the rule needs none (to show them)."""
    prompts = list(prompts)
    cands = candidates(prompts)
    if not cands:
        shared = "the prompt has" if len(prompts) == 1 else f"the {len(prompts)} prompts share"
        raise EditError(f"no subject found: {shared} no span of words other than function words; give it with "
                        "--subject (subject=...)")
    drops = None
    if needs_scores(cands, rule) or (score_all and len(cands) > 1):  # the default rule needs none
        drops = corruption_drops(km, prompts, old, [c.text for c in cands], samples, noise_scale, seed).tolist()
    chosen = choose(cands, drops, rule)
    scores = {c.text: d for c, d in zip(cands, drops)} if drops is not None else {}
    return SubjectGuess(chosen.text, sum(bool(occurrences(p, chosen.text)) for p in prompts), len(prompts), rule, scores)
