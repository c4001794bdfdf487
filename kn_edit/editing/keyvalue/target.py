"""ROME's value v*: the output of layer l's value projection at the subject's last token that makes the new
object the model's answer (Meng et al. 2022, eq. 4).

δ (so v* = W k* + δ) is added to the value projection's output at the subject's last token of every row and
optimised with Adam on

    mean over rows (each edit prompt after each context prefix) of the mean NLL of new's tokens (teacher-forced)
    + kl_factor · KL(P_edited ‖ P_original) of the next token after "{subject} is a"
    + weight_decay · ‖δ‖² / ‖W k*‖²

with ‖δ‖ clamped to ``clamp_norm_factor · ‖W k*‖`` after every step (the paper's norm constraint). It stops
after ``steps`` evaluations, or as soon as the NLL term is below ``stop_loss``; δ is the last one evaluated.

Speed, exactly: δ changes nothing before the subject's last token (causal attention), so the tokens before it
run once and their keys/values are reused (the model's cache) by every step, which then runs only the few
tokens from the subject on. Every row runs in one padded forward per step (``_Padded``: each row's cached prefix
right-aligned in a masked, zero-padded cache, its suffix padded on the right, its own position ids), and only the
positions the objective reads reach the output head. The logits are the same (tests check them against each
row's full forward); on smollm2 (3 prompts × 6 prefixes, 1 thread) a step takes 0.84 s instead of 2.06 s with one
forward per group of rows of one shape (``evaluations/bench_value_step.py``). Caches this cannot rebuild (a
sliding window shorter than the rows, unknown layouts) run group by group.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ...errors import EditError
from ...progress import NullReporter, Reporter
from .keys import prompt_text, subject_end, token_at, with_prefix

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


def _cache_keyword(model) -> str:
    """The forward's keyword for past keys/values: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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


def _suffix_logits(km: KnModel, module: torch.nn.Module, group: _Group, delta: torch.Tensor,
                   select: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [g, length - start, vocab] of the group's positions from ``start`` on, δ added at ``start``; with
    ``select`` = (rows [n], positions [n], from ``start``) only those [n, vocab]: the other positions never reach
    the output head (a fifth of smollm2's compute per token, forward and backward)."""
    rows = torch.arange(len(group.members), device=km.device)
    at = torch.zeros(len(group.members), dtype=torch.long, device=km.device)
    # A fresh copy each step: the forward appends to the cache.
    cache = copy.deepcopy(group.cache) if group.cache is not None else None
    head = km.model.get_output_embeddings() if select is not None else None
    handle = None
    if head is not None:
        def selected(_module, args):
            hidden, *rest = args
            return (hidden[select[0], select[1]][:, None], *rest)

        handle = head.register_forward_pre_hook(selected)
    try:
        with added_output(module, rows, at, delta):
            extra = {_cache_keyword(km.model): cache} if cache is not None else {}
            logits = km.model(input_ids=group.ids[:, group.start :], use_cache=cache is not None, **extra).logits
    finally:
        if handle is not None:
            handle.remove()
    if select is None:
        return logits
    return logits[:, 0] if head is not None else logits[select[0], select[1]]


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


@dataclass
class _Padded:
    """Every row in one forward per step. Row i's cached prefix (its tokens before the subject's last one) is
    right-aligned in ``width`` cache columns, the columns before it zero and masked out; its suffix (from the
    subject's last token on) is left-aligned in ``ids`` [n, length], padded on the right (pad positions come after
    every real one, so causal attention never lets a real position see them). Position ids are each row's own.
    Every query sees at least itself, so no attention row is fully masked. One forward of n rows reads each weight
    matrix once instead of once per group: on CPU the small per-group products are bound by reading the weights."""

    ids: torch.Tensor  # [n, length]
    positions: torch.Tensor  # [n, length]
    mask: torch.Tensor  # [n, width + length]
    cache: object | None  # prefix keys/values [n, heads, width, head_dim] per layer; None when width == 0


def _padded(km: KnModel, rows: Sequence[Row], groups: Sequence[_Group]) -> _Padded | None:
    """The rows as one padded batch, built from the groups' prefix caches; None if the cache's layout is unknown."""
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
    if width == 0:
        return _Padded(ids, positions, mask, None)
    template = next(g.cache for g in groups if g.cache is not None)
    first = _cache_layers(template)
    window = _sliding_window(template)
    if first is None or (window is not None and width + length >= window):
        return None  # a layout this cannot rebuild, or a window the padded rows would overflow
    # Per layer: [n, heads, width, head_dim] zeros, each group's prefix keys/values at its rows' last columns.
    combined = [[torch.zeros((n, *t.shape[1:-2], width, t.shape[-1]), dtype=t.dtype, device=t.device) for t in kv]
                for kv in first]  # fmt: skip
    for group in groups:
        if group.cache is None:
            continue
        members = torch.tensor(group.members, device=km.device)
        for layer, kv in enumerate(_cache_layers(group.cache)):
            for which, tensor in enumerate(kv):
                combined[layer][which][members, ..., width - group.start :, :] = tensor
    cache = copy.deepcopy(template)
    _set_cache_layers(cache, combined)
    return _Padded(ids, positions, mask, cache)


def _padded_logits(km: KnModel, module: torch.nn.Module, plan: _Padded, delta: torch.Tensor,
                   select: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Logits [len(select[0]), vocab] at (row, position from the subject's last token) of ``select``, δ added at
    every row's subject's last token; only those positions reach the output head."""
    n = plan.ids.shape[0]
    cache = copy.deepcopy(plan.cache) if plan.cache is not None else None  # the forward appends to it
    head = km.model.get_output_embeddings()

    def selected(_module, args):
        hidden, *rest = args
        return (hidden[select[0], select[1]][:, None], *rest)

    handle = head.register_forward_pre_hook(selected)
    try:
        with added_output(module, torch.arange(n, device=km.device), torch.zeros(n, dtype=torch.long, device=km.device), delta):
            extra = {_cache_keyword(km.model): cache} if cache is not None else {}
            logits = km.model(input_ids=plan.ids, attention_mask=plan.mask, position_ids=plan.positions,
                              use_cache=cache is not None, **extra).logits  # fmt: skip
    finally:
        handle.remove()
    return logits[:, 0]


class _Steps:
    """The logits a step needs, at ``wanted`` (row, absolute position) pairs, in that order: one padded forward
    when the cache layout allows it, else one forward per group of rows of one shape."""

    def __init__(self, km: KnModel, rows: Sequence[Row], wanted: Sequence[tuple[int, int]], padded: bool = True) -> None:
        self.km, self.rows = km, list(rows)
        groups = _groups(km, self.rows)
        self.plan = _padded(km, self.rows, groups) if padded else None
        device = km.device
        if self.plan is not None:
            self.select = (torch.tensor([i for i, _ in wanted], device=device),
                           torch.tensor([p - self.rows[i].subject for i, p in wanted], device=device))  # fmt: skip
            return
        self.groups = groups
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

    def logits(self, module: torch.nn.Module, delta: torch.Tensor) -> torch.Tensor:
        if self.plan is not None:
            return _padded_logits(self.km, module, self.plan, delta, self.select)
        parts = [_suffix_logits(self.km, module, group, delta, self.group_select[g])
                 for g, group in enumerate(self.groups) if len(self.group_select[g][0])]  # fmt: skip
        return torch.cat(parts)[self.order]


def optimise_value(km: KnModel, layer: int, rows: Sequence[Row], kl: Row, init_norm: float, *, lr: float, steps: int,
                   stop_loss: float, kl_factor: float, weight_decay: float, clamp_norm_factor: float,
                   reporter: Reporter | None = None, padded: bool = True) -> ValueResult:
    """δ for ``rows`` (see the module docstring). init_norm: ‖W k*‖, the scale of the norm terms. ``padded``:
    every row in one padded forward per step (False: one forward per group of rows of one shape)."""
    reporter = reporter or NullReporter()
    device = km.device
    everything = list(rows) + [kl]
    # The (row, position) pairs the objective reads, answer tokens first, the KL position last: only those go
    # through the output head.
    wanted = [(i, p) for i, r in enumerate(rows) for p in r.answer] + [(len(rows), kl.answer[0])]
    steps_plan = _Steps(km, everything, wanted, padded=padded)
    token_rows = torch.tensor([i for i, r in enumerate(rows) for _ in r.answer], device=device)
    token_ids = torch.tensor([t for r in rows for t in r.targets], device=device)
    with torch.no_grad():
        reference = km.model(input_ids=kl.input_ids[None].to(device)).logits[0, kl.answer[0]]
        reference = torch.log_softmax(reference.float(), dim=-1)

    delta = torch.zeros(km.d_model, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    limit = clamp_norm_factor * init_norm
    result = ValueResult(delta=torch.zeros(km.d_model))
    module = km.value_proj(layer)
    with reporter.task(f"optimising v* (layer {layer})", total=steps) as task:
        for step in range(steps):
            logits = steps_plan.logits(module, delta)
            answer_logits, kl_logits = logits[:-1], logits[-1]
            nll, kl_term = objective(answer_logits, token_ids, token_rows, len(rows), kl_logits, reference)
            decay = weight_decay * delta.pow(2).sum() / max(init_norm, 1e-12) ** 2
            loss = nll + kl_factor * kl_term + decay
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
