"""Top- and bottom-activating text of given neurons: a batched, streaming scan of a corpus.

A text's score for a neuron is its *peak* activation: the maximum over the text's tokens (the first token holding
it is the "activating token", highlighted in the output). The scan keeps, per neuron, only the running k highest
and k lowest scores, so memory stays flat however long the corpus; each batch's forward pass stops after the
highest layer that holds a requested neuron (:mod:`kn_edit.analysis.forward`).

Tie order (deterministic): equal scores are ranked by the text's position in the corpus, earlier first, both in the
top list (score descending) and in the bottom list (score ascending).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from ..errors import ConfigError, DataError
from ..models.neurons import Neuron, check_neurons
from ..progress import NullReporter, Reporter
from ..models.prompts import encode_heads
from .forward import neuron_activations

if TYPE_CHECKING:
    from ..models.model import KnModel


@dataclass(frozen=True)
class TextHit:
    """One text's peak activation for a neuron. ``position``: token index of the peak; ``span``: its character
    range in ``text`` (None where the tokenizer gives no offsets)."""

    text_id: int
    score: float
    position: int
    token: str
    span: tuple[int, int] | None
    text: str


@dataclass
class NeuronTexts:
    neuron: Neuron
    top: list[TextHit]
    bottom: list[TextHit]


@dataclass
class ScanResult:
    neurons: list[Neuron]
    k: int
    per_neuron: list[NeuronTexts]
    n_texts: int
    n_tokens: int
    seconds: float
    last_layer: int  # the forward pass stopped after this layer (or ran to the end if stop_early was off)
    stop_early: bool
    settings: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "neurons": [str(n) for n in self.neurons], "k": self.k, "n_texts": self.n_texts, "n_tokens": self.n_tokens,
            "seconds": self.seconds, "tokens_per_second": self.tokens_per_second, "last_layer": self.last_layer,
            "stop_early": self.stop_early, "settings": self.settings,
            "per_neuron": [{"neuron": str(p.neuron), "top": [asdict(h) for h in p.top],
                            "bottom": [asdict(h) for h in p.bottom]} for p in self.per_neuron],
        }  # fmt: skip


class RunningExtremes:
    """Per neuron, the k highest and k lowest (score, text id) seen so far, plus the peak position of each.
    Holds at most k entries per neuron and list, whatever the number of updates."""

    def __init__(self, n_neurons: int, k: int) -> None:
        self.k = k
        empty_f = torch.empty(n_neurons, 0)
        empty_l = torch.empty(n_neurons, 0, dtype=torch.long)
        self.top = (empty_f, empty_l, empty_l)  # scores, text ids, positions
        self.bottom = (empty_f, empty_l, empty_l)

    def _merge(self, kept, scores, ids, positions, descending: bool):
        s = torch.cat([kept[0], scores], dim=1)
        i = torch.cat([kept[1], ids], dim=1)
        p = torch.cat([kept[2], positions], dim=1)
        # Stable sorts: first by text id, then by score, so equal scores stay in text-id order.
        order = torch.sort(i, dim=1, stable=True).indices
        s, i, p = s.gather(1, order), i.gather(1, order), p.gather(1, order)
        order = torch.sort(s, dim=1, descending=descending, stable=True).indices[:, : self.k]
        return s.gather(1, order), i.gather(1, order), p.gather(1, order)

    def update(self, scores: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """scores, positions [n_neurons, batch]; ids [batch] (the texts' corpus positions)."""
        ids = ids.expand_as(scores)
        self.top = self._merge(self.top, scores, ids, positions, descending=True)
        self.bottom = self._merge(self.bottom, scores, ids, positions, descending=False)

    def held_ids(self) -> set[int]:
        return set(self.top[1].flatten().tolist()) | set(self.bottom[1].flatten().tolist())

    def size(self) -> int:
        """Entries held per neuron and list (at most k)."""
        return max(self.top[0].shape[1], self.bottom[0].shape[1])


def _batches(texts: Iterable[str], size: int, bucket: int) -> Iterator[list[tuple[int, str]]]:
    """Batches of (corpus position, text); within each bucket of ``bucket`` batches the texts are sorted by length
    so that batches pad little (the ids keep the corpus order for ranking)."""
    buffer: list[tuple[int, str]] = []
    for item in enumerate(texts):
        buffer.append(item)
        if len(buffer) == size * bucket:
            yield from _split(buffer, size)
            buffer = []
    if buffer:
        yield from _split(buffer, size)


def _split(buffer: list[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    ordered = sorted(buffer, key=lambda it: (len(it[1]), it[0]))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def _encode(km: KnModel, texts: Sequence[str], max_tokens: int):
    """(input_ids, attention_mask [batch, seq], offsets per text or None)."""
    tok = km.tokenizer
    fast = getattr(tok, "is_fast", False)
    # Each text's first max_tokens tokens, tokenizing only its head (a one-line book costs a page), cut by hand:
    # not every tokenizer backend supports the truncation settings.
    enc = encode_heads(tok, list(texts), max_tokens, add_special_tokens=True, return_offsets_mapping=fast)
    seqs = [torch.tensor(ids, dtype=torch.long) for ids in enc["input_ids"]]
    if any(len(s) == 0 for s in seqs):
        seqs = [s if len(s) else torch.tensor([km._pad_id]) for s in seqs]
    ids, mask = km.pad(seqs)
    return ids, mask, (enc["offset_mapping"] if fast else None)


def scan_scores(km: KnModel, ids: torch.Tensor, mask: torch.Tensor, neurons: Sequence[Neuron], stop_early: bool = True):
    """(peak scores [n_neurons, batch], peak positions [n_neurons, batch]) of a padded batch."""
    layers: dict[int, list[int]] = {}
    for n in neurons:
        layers.setdefault(n.layer, []).append(n.index)
    acts = neuron_activations(km, ids, mask, layers, stop_early)
    cursor = {l: 0 for l in layers}
    columns = []
    for n in neurons:
        columns.append(acts[n.layer][..., cursor[n.layer]])
        cursor[n.layer] += 1
    act = torch.stack(columns, dim=0)  # [n_neurons, batch, seq]
    act = act.masked_fill(~mask.bool()[None], float("-inf"))
    # argmax returns the first maximal position, so the activating token is deterministic.
    positions = act.argmax(dim=2)
    scores = act.gather(2, positions[..., None])[..., 0]
    return scores.cpu(), positions.cpu()


def top_texts(
    km: KnModel,
    neurons: Sequence[Neuron],
    texts: Iterable[str],
    k: int = 20,
    batch_size: int = 32,
    max_tokens: int = 128,
    stop_early: bool = True,
    bucket: int = 8,
    reporter: Reporter | None = None,
    total: int | None = None,
    on_batch=None,
) -> ScanResult:
    """Scan ``texts`` (any iterable, read once) for the k top- and bottom-activating texts of each neuron.
    ``total``: number of texts, if known (for the progress bar); ``on_batch(extremes)`` is called after each batch
    (tests check the bound on memory with it)."""
    if k < 1:
        raise ConfigError(f"-k must be at least 1 (got {k})")
    if batch_size < 1 or max_tokens < 2:
        raise ConfigError("batch size must be at least 1 and max tokens at least 2")
    neurons = check_neurons(neurons, km.n_layers, km.d_ff)
    if not neurons:
        raise ConfigError("give at least one neuron")
    reporter = reporter or NullReporter()
    extremes = RunningExtremes(len(neurons), k)
    held: dict[int, tuple] = {}  # text id -> (text, offsets, token ids) of texts still in some list
    n_texts = n_tokens = 0
    start = time.perf_counter()
    with reporter.task("scanning text (tokens)", total=None) as task:
        for batch in _batches(texts, batch_size, bucket):
            ids, mask, offsets = _encode(km, [t for _, t in batch], max_tokens)
            scores, positions = scan_scores(km, ids, mask, neurons, stop_early)
            text_ids = torch.tensor([i for i, _ in batch], dtype=torch.long)
            extremes.update(scores, text_ids, positions)
            for row, (i, text) in enumerate(batch):
                held[i] = (text, offsets[row] if offsets is not None else None, ids[row, : int(mask[row].sum())].tolist())
            keep = extremes.held_ids()
            for i in [i for i in held if i not in keep]:
                del held[i]
            n_texts += len(batch)
            tokens = int(mask.sum())
            n_tokens += tokens
            task.advance(tokens)
            if on_batch is not None:
                on_batch(extremes, held)
    seconds = time.perf_counter() - start
    if n_texts == 0:
        raise DataError("the corpus has no text")

    def hits(kept, row: int) -> list[TextHit]:
        out = []
        for s, i, p in zip(kept[0][row].tolist(), kept[1][row].tolist(), kept[2][row].tolist()):
            text, offsets, token_ids = held[i]
            span = tuple(offsets[p]) if offsets is not None else None
            out.append(TextHit(i, s, p, km.tokenizer.decode([token_ids[p]]), span, text))
        return out

    per = [NeuronTexts(n, hits(extremes.top, r), hits(extremes.bottom, r)) for r, n in enumerate(neurons)]
    last = max(n.layer for n in neurons) if stop_early else km.n_layers - 1
    settings = {"batch_size": batch_size, "max_tokens": max_tokens}
    return ScanResult(neurons, k, per, n_texts, n_tokens, seconds, last, stop_early, settings)


def markdown(result: ScanResult, title: str = "Top- and bottom-activating text") -> str:
    """The lists as markdown, the activating token in bold."""

    def show(hit: TextHit) -> str:
        if hit.span is None or hit.span[1] <= hit.span[0]:
            return f"{hit.text} (token {hit.token!r})"
        a, b = hit.span
        while a < b - 1 and hit.text[a].isspace():  # BPE tokens carry their leading space; bold needs none inside
            a += 1
        return f"{hit.text[:a]}**{hit.text[a:b]}**{hit.text[b:]}"

    lines = [f"# {title}", "", f"{result.n_texts} texts, {result.n_tokens} tokens, "
             f"{result.tokens_per_second:.0f} tokens/s; score: a text's peak activation (bold: the token holding it)", ""]  # fmt: skip
    for p in result.per_neuron:
        lines += [f"## neuron {p.neuron}", "", "| rank | score | text |", "| --- | --- | --- |"]
        lines += [f"| top {r + 1} | {h.score:.4g} | {show(h).replace('|', '/')} |" for r, h in enumerate(p.top)]
        lines += [f"| bottom {r + 1} | {h.score:.4g} | {show(h).replace('|', '/')} |" for r, h in enumerate(p.bottom)]
        lines.append("")
    return "\n".join(lines)
