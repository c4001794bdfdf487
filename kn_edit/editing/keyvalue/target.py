"""ROME's value v*: the output of layer l's value projection at the subject's last token that makes the new
object the model's answer (Meng et al. 2022, eq. 4).

δ (so v* = W k* + δ) is added to the value projection's output at the subject's last token of every row and
optimised with Adam on

    mean over rows (each edit prompt after each context prefix) of the mean NLL of new's tokens (teacher-forced)
    + kl_factor · KL(P_edited ‖ P_original) of the next token after "{subject} is a"
    + weight_decay · ‖δ‖² / ‖W k*‖²
    + neighbour_factor · KL(P_original ‖ P_edited) of other subjects' answers, the update's share of δ added at
      each of their tokens (``neighbours``, kn_edit.editing.keyvalue.neighbours; kn-subject's nearest_kl, off
      by default)

with ‖δ‖ clamped to ``clamp_norm_factor · ‖W k*‖`` after every step (the paper's norm constraint). It stops
after ``steps`` evaluations, or as soon as the NLL term is below ``stop_loss``; δ is the last one evaluated.

Speed, exactly (the same logits and gradients, to float rounding; tests check them against each row's own
forward through every block):

* δ changes nothing before the subject's last token (causal attention), so the tokens before it run once, in one
  right-padded forward (``_prefixes``), and their keys/values are reused (the model's cache) by every step,
  which then runs only the few tokens from the subject on.
* Every row runs in one forward per step: packed (``_packed``: every row's suffix one after the other in one
  sequence, every row's prefix one after the other in the cache, a 4-D mask letting each token see only its own
  row, each row's own position ids), so no position is computed for padding; where the attention implementation
  or a sliding window rules that out, padded (``_Padded``: each row's prefix right-aligned in a masked,
  zero-padded cache, its suffix padded on the right), and where the cache cannot be rebuilt (a sliding window
  shorter than the rows, unknown layouts) group by group.
* Only the positions the objective reads reach the output head (``_head_at``).
* From the edited layer up only: δ is added inside block l, so no block below it sees δ (at any position). The
  first step runs every block once more without gradient and keeps block l − 1's output; from then on the blocks
  below l return that output instead of computing it (``skipped``). The model's own forward still runs around
  them (its masks, rotary or absolute positions, caches, final norm, head), so every family is driven the same
  way, and the backward covers only blocks l and up. The first skipping step is checked against that full
  forward (the same operations on the same inputs); a model where they differ (a forward that carries more than
  the hidden states from block to block) runs every block.
* P_original is the first step's own KL distribution (δ = 0 there), not a forward of its own.

On smollm2 (3 prompts × 6 prefixes, layer 5 of 30, one loaded core) a step takes 0.81 s, against 1.09 s padded
through every block and 1.95 s with one forward per group of rows; a whole ROME edit of one fact 1.5× less CPU
time than before these, MEMIT 2.6× (``evaluations/bench_value_step.py``, evaluations/README.md).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ...errors import EditError
from ...models.adapters import first_submodule
from ...models.forward_args import cache_keyword
from ...progress import NullReporter, Reporter
from .keys import prompt_text, subject_end, token_at, with_prefix
from .neighbours import NeighbourRows, neighbour_kl, spread_output

if TYPE_CHECKING:
    from ...models.model import KnModel


@dataclass(frozen=True)
class Row:
    """One forward row: ids [seq], the subject's last token, and (position, token) of each answer token."""

    input_ids: torch.Tensor
    subject: int
    answer: tuple[int, ...]
    targets: tuple[int, ...]


def rewrite_rows(km: KnModel, prompts: Sequence[str], subject: str, new: str, prefixes: Sequence[str]) -> list[Row]:
    """Every prompt after every prefix, with ``new`` teacher-forced (all its tokens)."""
    rows = []
    for prompt in prompts:
        prompt = prompt_text(prompt)
        end = subject_end(prompt, subject)
        for prefix in prefixes:
            text = with_prefix(prefix, prompt)
            enc = km.encode(text, new)
            ids, pos = token_at(km.tokenizer, text, len(text) - len(prompt) + end)
            full = enc.steps[-1].input_ids
            if full[: len(ids)].tolist() != ids:
                raise EditError(f"prompt {text!r} tokenizes differently with {new!r} after it")  # pragma: no cover
            rows.append(Row(full, pos, tuple(s.position for s in enc.steps), tuple(s.target_id for s in enc.steps)))
    return rows


def kl_row(km: KnModel, subject: str) -> Row:
    """The paper's essence prompt "{subject} is a": the next-token distribution after it is kept."""
    text = f"{subject.strip()} is a"
    ids, pos = token_at(km.tokenizer, text, len(subject.strip()))
    return Row(torch.tensor(ids, dtype=torch.long), pos, (len(ids) - 1,), (-1,))


@contextmanager
def added_output(module: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` [d_model] to ``module``'s output [batch, seq, d_model] at (rows[i], positions[i])."""

    def hook(_module, _args, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[rows, positions] = out[rows, positions] + delta.to(out.dtype)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class ValueResult:
    delta: torch.Tensor  # [d_model] float32 CPU: v* − W k*
    losses: list[float] = field(default_factory=list)  # total loss at each evaluation
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    neighbour_kl: list[float] = field(default_factory=list)  # KL of the neighbours' answers at each evaluation
    stopped_early: bool = False
    clamped: bool = False  # the norm constraint was active at the end


def objective(answer_logits: torch.Tensor, token_ids: torch.Tensor, token_rows: torch.Tensor, n_rows: int,
              kl_logits: torch.Tensor, kl_reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL term, KL term). answer_logits [n_tokens, vocab]: the logits that predict answer token ``token_ids[i]``
    of rewrite row ``token_rows[i]``; per row the mean NLL of its tokens, averaged over the ``n_rows`` rows.
    KL(P ‖ P_reference) of kl_logits [vocab] against the reference log-probs [vocab]."""
    logp = torch.log_softmax(answer_logits.float(), dim=-1)  # [n_tokens, vocab]
    nll = -logp[torch.arange(len(token_ids), device=logp.device), token_ids]  # [n_tokens]
    per_row = torch.zeros(n_rows, device=nll.device).index_add(0, token_rows, nll)
    counts = torch.zeros(n_rows, device=nll.device).index_add(0, token_rows, torch.ones_like(nll))
    kl_logp = torch.log_softmax(kl_logits.float(), dim=-1)
    kl = (kl_logp.exp() * (kl_logp - kl_reference)).sum()
    return (per_row / counts).mean(), kl


@dataclass
class _Group:
    """Rows of one shape: the subject's last token at ``start``, ``length`` tokens. Positions before ``start``
    do not depend on δ, so they run once (``cache``: their keys and values) and every step runs only the rest."""

    members: list[int]  # indices into the rows (the KL row last)
    start: int
    ids: torch.Tensor  # [g, length]
    cache: object | None  # the model's past_key_values for ids[:, :start]; None when start == 0


def _groups(km: KnModel, rows: Sequence[Row]) -> list[_Group]:
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(rows):
        by_shape.setdefault((r.subject, len(r.input_ids)), []).append(i)
    out = []
    for (start, _), members in by_shape.items():
        ids = torch.stack([rows[i].input_ids for i in members]).to(km.device)
        cache = None
        if start > 0:
            with torch.no_grad():
                head = km.model(input_ids=ids[:, :start], use_cache=True)
                cache = head["cache"] if "cache" in head.keys() else head["past_key_values"]
        out.append(_Group(members, start, ids, cache))
    return out


def blocks(km: KnModel) -> torch.nn.ModuleList:
    """The model's transformer blocks (the adapter's layer list; KnModel checked that it exists)."""
    return first_submodule(km.model, km.adapter.layers)


@dataclass
class _Below:
    """The blocks below the edited layer, and the output the last of them gave in one full forward of the inputs
    a step runs (nothing below the layer δ is added in depends on δ)."""

    blocks: list[torch.nn.Module]
    output: object  # block l − 1's output, as it returned it (a tensor, or a tuple in older transformers)


@contextmanager
def skipped(below: _Below | None) -> Iterator[None]:
    """While inside, each of ``below.blocks`` returns ``below.output`` without computing anything: the model's
    forward still runs around them (masks, positions, cache, final norm, head), blocks l and up on that output.
    Only the last skipped block's output reaches block l; the others' are overwritten by the next one's."""
    if below is None:
        yield
        return
    own = [block.__dict__.get("forward") for block in below.blocks]  # an instance's own forward, if it had one
    for block in below.blocks:
        block.forward = lambda *_args, **_kwargs: below.output
    try:
        yield
    finally:
        for block, forward in zip(below.blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _layer_of(km: KnModel, module: torch.nn.Module) -> int | None:
    """The index of the block holding ``module`` (None: in none of them)."""
    return next((i for i, block in enumerate(blocks(km)) if any(m is module for m in block.modules())), None)


def _captured(km: KnModel, layer: int, forward) -> tuple[_Below, torch.Tensor]:
    """(the blocks below ``layer`` with block ``layer`` − 1's output, the logits) of ``forward(None)`` run once
    through every block without gradient."""
    below = list(blocks(km))[:layer]
    got = {}
    handle = below[-1].register_forward_hook(lambda _module, _args, output: got.setdefault("output", output))
    try:
        with torch.no_grad():
            logits = forward(None)
    finally:
        handle.remove()
    return _Below(below, got["output"]), logits


def _agrees(got: torch.Tensor, full: torch.Tensor) -> bool:
    """Whether logits of a step that skipped the lower blocks equal the full forward's: the same operations on the
    same inputs, so they differ by float rounding at most; a forward the skipping got wrong moves them by about
    the logits' own scale."""
    tolerance = 1e-3 if full.dtype in (torch.float32, torch.float64) else 5e-2
    scale = max(1.0, float(full.abs().max()))
    return bool(torch.isfinite(got).all()) and float((got.float() - full.float()).abs().max()) <= tolerance * scale


def _suffix_logits(km: KnModel, module: torch.nn.Module, group: _Group, delta: torch.Tensor,
                   select: tuple[torch.Tensor, torch.Tensor] | None = None, below: _Below | None = None) -> torch.Tensor:
    """Logits [g, length - start, vocab] of the group's positions from ``start`` on, δ added at ``start``; with
    ``select`` = (rows [n], positions [n], from ``start``) only those [n, vocab] (``_head_at``). ``below``: the
    blocks below the edited layer skipped."""
    rows = torch.arange(len(group.members), device=km.device)
    at = torch.zeros(len(group.members), dtype=torch.long, device=km.device)
    # A fresh copy each step: the forward appends to the cache.
    cache = copy.deepcopy(group.cache) if group.cache is not None else None
    with _head_at(km, select) as reduced, added_output(module, rows, at, delta), skipped(below):
        extra = {cache_keyword(km.model) or "past_key_values": cache} if cache is not None else {}
        logits = km.model(input_ids=group.ids[:, group.start :], use_cache=cache is not None, **extra).logits
    if select is None:
        return logits
    return logits[:, 0] if reduced else logits[select[0], select[1]]


# Cache layers whose state is their keys and values only (the sliding one also counts the tokens it has seen,
# ``cumulative_length``, set below): they can be rebuilt from padded tensors.
_REBUILDABLE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _cache_layers(cache) -> list[list[torch.Tensor]] | None:
    """Per layer [keys, values] ([batch, heads, seq, head_dim]) of a transformers KV cache, or None for a cache
    kept another way (then the rows run group by group). transformers 5 keeps them in ``cache.layers``; 4.x in
    ``key_cache`` / ``value_cache`` lists."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if not all(type(layer).__name__ in _REBUILDABLE_LAYERS for layer in layers):
            return None
        return [[layer.keys, layer.values] for layer in layers]
    if isinstance(getattr(cache, "key_cache", None), list) and isinstance(getattr(cache, "value_cache", None), list):
        return [[k, v] for k, v in zip(cache.key_cache, cache.value_cache)]
    return None


def _sliding_window(cache) -> int | None:
    windows = [layer.sliding_window for layer in getattr(cache, "layers", None) or [] if hasattr(layer, "sliding_window")]
    return min(windows) if windows else None


def _set_cache_layers(cache, tensors: list[list[torch.Tensor]]) -> None:
    if getattr(cache, "layers", None) is not None:
        for layer, (keys, values) in zip(cache.layers, tensors):
            layer.keys, layer.values = keys, values
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = keys.shape[-2]
    else:
        cache.key_cache, cache.value_cache = [k for k, _ in tensors], [v for _, v in tensors]


@contextmanager
def _head_at(km: KnModel, select: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[bool]:
    """Only the hidden states at ``select`` = (batch rows [k], columns [k]) reach the output head, which then gives
    logits [k, 1, vocab]: the vocabulary projection of every other position (a fifth of smollm2's compute per
    token, forward and backward) would be thrown away. What follows the head in the families' forward (Gemma's
    logit soft-capping) is per position. Yields False (every position computed) for a model without a head module."""
    head = km.model.get_output_embeddings() if select is not None else None
    if head is None:
        yield False
        return

    def selected(_module, args):
        hidden, *rest = args
        return (hidden[select[0], select[1]][:, None], *rest)

    handle = head.register_forward_pre_hook(selected)
    try:
        yield True
    finally:
        handle.remove()


@dataclass
class _Prefixes:
    """Every row's prefix (its tokens before the subject's last one) run once, in one right-padded forward (pad
    positions come after every real one, so real positions keep their keys and values)."""

    template: object | None  # the forward's cache, whose copies the plans fill (None: no row has a prefix)
    kv: list[list[list[torch.Tensor]] | None]  # per row, per layer [keys, values] [heads, prefix, head_dim]


def _prefixes(km: KnModel, rows: Sequence[Row]) -> _Prefixes | None:
    """The rows' prefixes, or None for a cache this cannot take apart (an unknown layout, or a sliding window the
    longest prefix reaches, where the cache keeps only the window's last columns)."""
    having = [i for i, r in enumerate(rows) if r.subject > 0]
    kv: list[list[list[torch.Tensor]] | None] = [None] * len(rows)
    if not having:
        return _Prefixes(None, kv)
    ids, mask = km.pad([rows[i].input_ids[: rows[i].subject] for i in having])
    first = torch.zeros(len(having), dtype=torch.long, device=km.device)
    with torch.no_grad(), _head_at(km, (torch.arange(len(having), device=km.device), first)):
        out = km.model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
    layers, window = _cache_layers(cache), _sliding_window(cache)
    if layers is None or (window is not None and ids.shape[1] >= window):
        return None
    for k, i in enumerate(having):
        kv[i] = [[t[k, ..., : rows[i].subject, :] for t in layer] for layer in layers]
    return _Prefixes(cache, kv)


def _filled(template, layers: list[list[torch.Tensor]]):
    cache = copy.deepcopy(template)
    _set_cache_layers(cache, layers)
    return cache


@dataclass
class _Padded:
    """Every row in one forward per step. Row i's cached prefix (its tokens before the subject's last one) is
    right-aligned in ``width`` cache columns, the columns before it zero and masked out; its suffix (from the
    subject's last token on) is left-aligned in ``ids`` [n, length], padded on the right (pad positions come after
    every real one, so causal attention never lets a real position see them). Position ids are each row's own.
    Every query sees at least itself, so no attention row is fully masked. One forward of n rows reads each weight
    matrix once instead of once per group: on CPU the small per-group products are bound by reading the weights.
    ``_packed`` lays the same rows out without the padding, in one sequence."""

    ids: torch.Tensor  # [batch, length]
    positions: torch.Tensor  # [batch, length]
    mask: torch.Tensor  # [batch, width + length], or a 4-D mask the model takes as it is
    cache: object | None  # prefix keys/values [batch, heads, width, head_dim] per layer; None when width == 0
    place: list[tuple[int, int]]  # per row: (batch row, column) of its subject's last token in ``ids``

    def at(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch rows [n], columns [n]) of every row's subject's last token: where δ is added."""
        return (torch.tensor([b for b, _ in self.place], device=device),
                torch.tensor([c for _, c in self.place], device=device))  # fmt: skip


def _padded(km: KnModel, rows: Sequence[Row], prefixes: _Prefixes) -> _Padded | None:
    """The rows as one padded batch; None where a sliding window is shorter than the padded rows."""
    n, width = len(rows), max(r.subject for r in rows)
    length = max(len(r.input_ids) - r.subject for r in rows)
    ids = torch.zeros(n, length, dtype=torch.long, device=km.device)
    positions = torch.zeros(n, length, dtype=torch.long, device=km.device)
    mask = torch.zeros(n, width + length, dtype=torch.long, device=km.device)
    for i, r in enumerate(rows):
        suffix = r.input_ids[r.subject :]
        ids[i, : len(suffix)] = suffix.to(km.device)
        ids[i, len(suffix) :] = int(suffix[-1])  # any token: never read, never seen by a real position
        positions[i] = torch.arange(r.subject, r.subject + length, device=km.device)
        mask[i, width - r.subject :] = 1
    place = [(i, 0) for i in range(n)]
    if prefixes.template is None:
        return _Padded(ids, positions, mask, None, place)
    window = _sliding_window(prefixes.template)
    if window is not None and width + length >= window:
        return None
    # Per layer: [n, heads, width, head_dim] zeros, each row's prefix keys/values in its last columns.
    some = next(kv for kv in prefixes.kv if kv is not None)
    combined = [[t.new_zeros((n, *t.shape[:-2], width, t.shape[-1])) for t in layer] for layer in some]
    for i, kv in enumerate(prefixes.kv):
        for layer, pair in zip(combined, kv or []):
            for which, t in enumerate(pair):
                layer[which][i, ..., width - t.shape[-2] :, :] = t
    return _Padded(ids, positions, mask, _filled(prefixes.template, combined), place)


# The attention implementations whose 4-D masks ``_packed`` can write: allowed pairs True (sdpa), or 0 and the
# dtype's lowest value added to the scores (eager).
_PACKABLE = ("sdpa", "eager")


def _packed(km: KnModel, rows: Sequence[Row], prefixes: _Prefixes) -> _Padded | None:
    """The rows without padding: one sequence of every row's suffix after the other, and a cache of every row's
    prefix after the other, with a 4-D mask that lets each token see its own row's prefix and its own row's
    suffix up to itself, and each row's own position ids: the same logits as each row's own forward, no position
    computed for padding. None where this cannot be laid out: an attention implementation whose mask it does not
    know, or a sliding window a row reaches (the 4-D mask is every layer's, so it holds only within the window)."""
    implementation = getattr(km.model.config, "_attn_implementation", None)
    if implementation not in _PACKABLE:
        return None
    window = (_sliding_window(prefixes.template) if prefixes.template is not None
              else getattr(km.model.config, "sliding_window", None))
    if window is not None and max(len(r.input_ids) for r in rows) >= window:
        return None
    device = km.device
    lengths = [len(r.input_ids) - r.subject for r in rows]
    ids = torch.cat([r.input_ids[r.subject :] for r in rows])[None].to(device)  # [1, T]
    positions = torch.cat([torch.arange(r.subject, len(r.input_ids)) for r in rows])[None].to(device)
    token_row = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])  # [T]
    prefix_row = torch.cat([torch.full((r.subject,), i) for i, r in enumerate(rows)])  # [P]
    allowed = token_row[:, None] == torch.cat([prefix_row, token_row])[None, :]  # [T, P + T]: its own row's ...
    allowed[:, len(prefix_row) :] &= torch.ones(len(token_row), len(token_row), dtype=torch.bool).tril()  # ... so far
    if implementation == "sdpa":
        mask = allowed[None, None].to(device)
    else:
        dtype = next(km.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None].to(device)
    place = [(0, sum(lengths[:i])) for i in range(len(rows))]
    if prefixes.template is None:
        return _Padded(ids, positions, mask, None, place)
    kv = [k for k in prefixes.kv if k is not None]
    combined = [[torch.cat([row[layer][which] for row in kv], dim=-2)[None] for which in (0, 1)]
                for layer in range(len(kv[0]))]  # fmt: skip
    return _Padded(ids, positions, mask, _filled(prefixes.template, combined), place)


def _padded_logits(km: KnModel, module: torch.nn.Module, plan: _Padded, delta: torch.Tensor,
                   select: tuple[torch.Tensor, torch.Tensor], below: _Below | None = None) -> torch.Tensor:
    """Logits [len(select[0]), vocab] at (batch row, column) of ``select``, δ added at every row's subject's last
    token; only those positions reach the output head. ``below``: the blocks below the edited layer skipped."""
    cache = copy.deepcopy(plan.cache) if plan.cache is not None else None  # the forward appends to it
    with _head_at(km, select) as reduced, added_output(module, *plan.at(km.device), delta), skipped(below):
        extra = {cache_keyword(km.model) or "past_key_values": cache} if cache is not None else {}
        logits = km.model(input_ids=plan.ids, attention_mask=plan.mask, position_ids=plan.positions,
                          use_cache=cache is not None, **extra).logits  # fmt: skip
    return logits[:, 0] if reduced else logits[select[0], select[1]]


def neighbour_logits(km: KnModel, module: torch.nn.Module, rows: NeighbourRows, delta: torch.Tensor) -> torch.Tensor:
    """[n, vocab]: each neighbour row's answer logits with its tokens' shares of δ added to ``module``'s output
    (kn_edit.editing.keyvalue.neighbours); only the answer positions reach the output head."""
    select = (torch.arange(len(rows.last), device=km.device), rows.last.to(km.device))
    with _head_at(km, select) as reduced, spread_output(module, rows.shares, delta):
        logits = km.model(input_ids=rows.input_ids, attention_mask=rows.mask).logits
    return logits[:, 0] if reduced else logits[select[0], select[1]]


class _Steps:
    """The logits a step needs, at ``wanted`` (row, absolute position) pairs, in that order: one packed forward (or
    padded, with ``packed`` False or where packing is ruled out) when the cache layout allows it, else one forward
    per group of rows of one shape (``padded`` False: always). ``upper``: from the edited layer up only (False:
    every block, every step). See the module docstring."""

    def __init__(self, km: KnModel, rows: Sequence[Row], wanted: Sequence[tuple[int, int]], padded: bool = True,
                 upper: bool = True, packed: bool = True) -> None:
        self.km, self.rows = km, list(rows)
        self.upper = upper
        # per forward, the blocks below the edited layer and their output (None: run every block), set at the
        # first step, for the value projection it was given
        self.below: list[_Below | None] | None = None
        self._module: torch.nn.Module | None = None
        self.plan = None
        prefixes = _prefixes(km, self.rows) if padded else None
        if prefixes is not None:
            self.plan = (_packed(km, self.rows, prefixes) if packed else None) or _padded(km, self.rows, prefixes)
        device = km.device
        if self.plan is not None:
            place = self.plan.place
            self.select = (torch.tensor([place[i][0] for i, _ in wanted], device=device),
                           torch.tensor([place[i][1] + p - self.rows[i].subject for i, p in wanted], device=device))  # fmt: skip
            return
        self.groups = groups = _groups(km, self.rows)
        place = {i: (g, j) for g, group in enumerate(groups) for j, i in enumerate(group.members)}
        per_group: list[list[tuple[int, int]]] = [[] for _ in groups]
        order = []  # where each wanted pair lands in the concatenation of the groups' selections
        for i, p in wanted:
            g, j = place[i]
            order.append((g, len(per_group[g])))
            per_group[g].append((j, p - self.rows[i].subject))
        offsets = [0]
        for picks in per_group:
            offsets.append(offsets[-1] + len(picks))
        self.order = torch.tensor([offsets[g] + k for g, k in order], device=device)
        self.group_select = [(torch.tensor([j for j, _ in picks], device=device, dtype=torch.long),
                              torch.tensor([p for _, p in picks], device=device, dtype=torch.long))
                             for picks in per_group]  # fmt: skip

    def _forwards(self, module: torch.nn.Module, delta: torch.Tensor) -> list:
        """One callable per forward of a step: given the blocks to skip (or None), its selected logits."""
        if self.plan is not None:
            return [lambda below: _padded_logits(self.km, module, self.plan, delta, self.select, below)]
        return [lambda below, g=g, group=group: _suffix_logits(self.km, module, group, delta, self.group_select[g], below)
                for g, group in enumerate(self.groups) if len(self.group_select[g][0])]  # fmt: skip

    @property
    def skipping(self) -> bool:
        """Whether the steps so far ran from the edited layer up only."""
        return bool(self.below) and all(b is not None for b in self.below)

    def logits(self, module: torch.nn.Module, delta: torch.Tensor) -> torch.Tensor:
        forwards = self._forwards(module, delta)
        if self.below is not None and module is self._module:
            parts = [forward(below) for forward, below in zip(forwards, self.below)]
        else:  # the first step for this value projection
            self._module = module
            layer = _layer_of(self.km, module) if self.upper else None
            if not layer:  # nothing below it (or not asked): every block
                self.below = [None] * len(forwards)
                parts = [forward(None) for forward in forwards]
            else:
                captured = [_captured(self.km, layer, forward) for forward in forwards]
                self.below = [below for below, _ in captured]
                parts = [forward(below) for forward, below in zip(forwards, self.below)]
                if not all(_agrees(got.detach(), full) for got, (_, full) in zip(parts, captured)):
                    self.below = [None] * len(forwards)  # this model's forward is not skipped this way
                    parts = [forward(None) for forward in forwards]
        return parts[0] if self.plan is not None else torch.cat(parts)[self.order]


def optimise_value(km: KnModel, layer: int, rows: Sequence[Row], kl: Row, init_norm: float, *, lr: float, steps: int,
                   stop_loss: float, kl_factor: float, weight_decay: float, clamp_norm_factor: float,
                   reporter: Reporter | None = None, padded: bool = True, upper: bool = True,
                   neighbours: NeighbourRows | None = None, neighbour_factor: float = 0.0) -> ValueResult:
    """δ for ``rows`` (see the module docstring). init_norm: ‖W k*‖, the scale of the norm terms. ``padded``:
    every row in one forward per step (False: one forward per group of rows of one shape). ``upper``: steps run
    the blocks from ``layer`` up only (False: every block). ``neighbours``: other prompts whose answers are kept
    (one more forward per step, through every block), weighed by ``neighbour_factor``."""
    reporter = reporter or NullReporter()
    device = km.device
    everything = list(rows) + [kl]
    # The (row, position) pairs the objective reads, answer tokens first, the KL position last: only those go
    # through the output head.
    wanted = [(i, p) for i, r in enumerate(rows) for p in r.answer] + [(len(rows), kl.answer[0])]
    steps_plan = _Steps(km, everything, wanted, padded=padded, upper=upper)
    token_rows = torch.tensor([i for i, r in enumerate(rows) for _ in r.answer], device=device)
    token_ids = torch.tensor([t for r in rows for t in r.targets], device=device)
    reference = None  # log P_original after "{subject} is a": the first step's (δ = 0 there)
    near_reference = None  # log P_original at the neighbours' answer positions

    delta = torch.zeros(km.d_model, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    limit = clamp_norm_factor * init_norm
    result = ValueResult(delta=torch.zeros(km.d_model))
    module = km.value_proj(layer)
    with reporter.task(f"optimising v* (layer {layer})", total=steps) as task:
        for step in range(steps):
            logits = steps_plan.logits(module, delta)
            answer_logits, kl_logits = logits[:-1], logits[-1]
            if reference is None:
                reference = torch.log_softmax(kl_logits.detach().float(), dim=-1)
            nll, kl_term = objective(answer_logits, token_ids, token_rows, len(rows), kl_logits, reference)
            decay = weight_decay * delta.pow(2).sum() / max(init_norm, 1e-12) ** 2
            loss = nll + kl_factor * kl_term + decay
            if neighbours is not None and neighbour_factor:
                near = neighbour_logits(km, module, neighbours, delta)
                if near_reference is None:
                    near_reference = torch.log_softmax(near.detach().float(), dim=-1)
                near_term = neighbour_kl(near, near_reference)
                result.neighbour_kl.append(float(near_term.detach()))
                loss = loss + neighbour_factor * near_term
            result.losses.append(float(loss.detach()))
            result.nll.append(float(nll.detach()))
            result.kl.append(float(kl_term.detach()))
            task.advance()
            if result.nll[-1] < stop_loss:
                result.stopped_early = step < steps - 1
                break
            if step == steps - 1:
                break
            # Only δ's gradient: the model's parameters are not touched (no .grad accumulates on them).
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            optimizer.step()
            with torch.no_grad():
                norm = float(delta.norm())
                if norm > limit:
                    delta.mul_(limit / norm)
    with torch.no_grad():
        result.delta = delta.detach().float().cpu().clone()
        result.clamped = float(result.delta.norm()) >= limit * (1 - 1e-4)
    return result
