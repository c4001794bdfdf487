"""Integrated-gradients attribution of FFN neurons (Dai et al. 2022), exact and batched.

For an answer step (answer position ``t``, gold token ``y``) and a layer ``l`` with original activation
``w = a_l[t]`` (the input of the value projection)::

    Attr(w_i) = w_i / m * sum_{k=0}^{m-1} dP(y | a_l[t] := (k/m) w) / d a_l[t]_i

(zero baseline, left Riemann sum, gradient of the softmax probability; only position ``t`` of layer ``l`` is
replaced, everything else computes normally). Public implementations run, per layer, a clean forward and
``m`` forward/backward passes over the whole prompt. The same numbers come out of far less work:

* **One batched pass for all layers.** Each (answer step, layer, k) is one row of the batch. At layer ``l``'s
  value-projection pre-hook, position ``t`` of the rows belonging to ``l`` is replaced by ``(k/m) * w`` built
  as a leaf tensor. In those rows nothing below ``l`` changed, so ``w`` is read from the row itself (no
  separate clean pass). Rows never interact, so one backward of the summed gold probabilities gives every
  row's own gradient exactly.
* **Prefix cache (causal LMs).** The answer position is the last input token and replacing it leaves every
  earlier position unchanged, so the prefix (positions < t) is run once with the KV cache and the rows only
  run the answer token against a batch-indexed copy of that cache. This is exact for every supported causal
  family (checked against a per-layer reference in tests, sliding-window Gemma 3 and Mistral included);
  masked LMs (BERT) see the whole sequence and use the full-sequence batched pass.
* **Triangular schedule.** Rows are ordered step, layer (by depth), k; a pass holds rows of one step. Below
  layer ``l`` a row of layer ``l`` is the clean forward, so the pass starts as that step's single clean row and
  the rows of each layer join the batch at their own block as copies of it (forward pre-hooks on the blocks,
  removed in ``finally``): no row runs, forward or backward, below its own layer. Only when several whole steps
  fit in one pass (few layers scored, or a large accelerator batch) do their rows share a pass from the first
  block.

Answer steps are grouped by sequence length, so no row is ever padded: scores do not depend on which other
prompts share a batch. Multi-token targets (not in the paper) are teacher-forced: each answer token is
attributed at its own position and the scores are averaged over the target's tokens.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..models.adapters import first_submodule
from ..models.forward_args import cache_keyword, keeps_last_logits
from ..errors import ConfigError, PromptError
from ..models.hooks import value_input_hooks
from ..models.prompts import AnswerStep

if TYPE_CHECKING:
    from ..models.model import KnModel

# Rough memory budget for one batched pass when the device cannot tell us (CPU).
_CPU_BUDGET_BYTES = 2 * 1024**3
# On CPU, passes of 200 to 400 rows were equally fast with the triangular schedule and 120 rows 5-8 % slower
# (smollm2-135m, one thread, 2 cores): a 30-layer step of m = 20 takes 2 passes. Accelerators prefer fewer,
# larger passes (bounded by memory).
_CPU_ROWS = 300
# Share of the free accelerator memory one batched pass may take.
_CUDA_BUDGET_SHARE = 0.5
_MAX_AUTO_ROWS = 4096


def attribute(
    km: KnModel,
    prompt: str,
    target: str,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    prefix_cache: bool | None = None,
) -> torch.Tensor:
    """Integrated-gradients scores of every FFN neuron for ``target`` after ``prompt``.

    Returns ``[len(layers) or n_layers, d_ff]``, float32 on CPU. ``steps`` is m of the Riemann sum.
    A multi-token target is teacher-forced: each of its tokens is attributed at its own answer position
    and the scores are averaged over its tokens. ``batch_size`` caps the rows (scaled copies) per
    forward pass (default: sized from the model and the free memory). ``prefix_cache`` forces the
    cached (True) or full-sequence (False) pass; None picks the cache for causal LMs that support one.
    """
    return attribute_prompts(km, [prompt], target, steps, layers, batch_size, prefix_cache)[0]


def attribute_prompts(
    km: KnModel,
    prompts: Sequence[str],
    target: str,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    prefix_cache: bool | None = None,
) -> torch.Tensor:
    """:func:`attribute` for several prompts of one fact, batched together: ``[n_prompts, L, d_ff]``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise PromptError("attribute_prompts needs a non-empty list of prompts")
    layers = check_options(km, steps, layers, batch_size, prefix_cache)
    encoded = [km.encode(p, target) for p in prompts]
    flat = [s for e in encoded for s in e.steps]
    scores = attribute_steps(km, flat, steps, layers, batch_size, prefix_cache)
    out, start = [], 0
    for e in encoded:
        out.append(scores[start : start + len(e.steps)].mean(dim=0))
        start += len(e.steps)
    return torch.stack(out)


def check_options(
    km: KnModel, steps: int, layers: Sequence[int] | None, batch_size: int | None, prefix_cache: bool | None
) -> list[int]:
    """Validate the attribution settings; the layer list to use."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer (the Riemann sum's m), got {steps!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if prefix_cache and km.is_masked_lm:
        raise ConfigError("prefix_cache=True needs a causal language model; a masked LM sees the whole sequence")
    return check_layers(km, layers)


def check_layers(km: KnModel, layers: Sequence[int] | None) -> list[int]:
    """The layer list to score: all layers for None, else distinct in-range indices (a ConfigError otherwise)."""
    if layers is None:
        return list(range(km.n_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ConfigError(f"layers must be a list of layer indices, got {layers!r}")
    chosen = list(layers)
    if not chosen:
        raise ConfigError("layers is empty: give at least one layer index, or None for all layers")
    for l in chosen:
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < km.n_layers:
            raise ConfigError(f"layer {l!r} out of range: this model has layers 0..{km.n_layers - 1}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"layers has duplicates: {chosen}")
    return chosen


def attribute_steps(
    km: KnModel,
    answer_steps: Sequence[AnswerStep],
    steps: int = 20,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    prefix_cache: bool | None = None,
    positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Scores ``[n_answer_steps, L, d_ff]`` (float32, CPU) of already encoded answer steps, one per step.

    positions: per step, the input position whose FFN activations are scaled and scored (e.g. the subject's
    last token), instead of the answer position; the answer's probability is still read at the answer
    position. Such steps run the full-sequence pass (the prefix cache needs the answer position)."""
    layers = check_options(km, steps, layers, batch_size, prefix_cache)
    if not answer_steps:
        return torch.zeros(0, len(layers), km.d_ff)
    if positions is not None:
        positions = list(positions)
        if len(positions) != len(answer_steps):
            raise ConfigError(f"{len(positions)} positions for {len(answer_steps)} answer steps")
        for p, s in zip(positions, answer_steps):
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= s.position:
                raise PromptError(f"position {p!r} is not an input position at or before the answer position {s.position}")
        if prefix_cache:
            raise ConfigError("prefix_cache=True scores the answer position only; leave it unset with positions")
        prefix_cache = False
    cache_kw = cache_keyword(km.model)
    use_cache = (not km.is_masked_lm and cache_kw is not None) if prefix_cache is None else prefix_cache
    if use_cache and cache_kw is None:
        raise ConfigError(f"{type(km.model).__name__}.forward takes no KV cache; use prefix_cache=False")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(answer_steps):
        groups[len(s.input_ids)].append(i)
    # Lightning's test loop (and callers' own code) may run under inference_mode/no_grad; IG needs gradients,
    # and tensors made inside inference mode could not be updated in place here.
    with torch.inference_mode(False), torch.enable_grad():
        scores = torch.zeros(len(answer_steps), len(layers), km.d_ff, dtype=torch.float32, device=km.device)
        for seq_len, members in groups.items():
            group = [answer_steps[i] for i in members]
            cached = use_cache and seq_len > 1
            if not km.is_masked_lm and any(s.position != seq_len - 1 for s in group):
                raise PromptError("a causal answer step must predict the token after its last input token")
            rows = batch_size or _auto_rows(km, seq_len, cached, steps)
            at = None if positions is None else torch.tensor([positions[i] for i in members])
            _attribute_group(km, group, torch.tensor(members), layers, steps, rows, cache_kw if cached else None, scores,
                             at)
    return (scores / steps).cpu()


def _output_cache(out):
    for name in ("cache", "past_key_values"):
        found = getattr(out, name, None)
        if found is not None:
            return found
    raise ConfigError("the model returned no KV cache; use prefix_cache=False")


def _select_cache(cache, index: torch.Tensor):
    """A copy of ``cache`` holding the batch entries ``index``; the original stays untouched for the next pass
    (a forward appends to the cache it is given). Per-layer state such as a sliding window's cumulative length
    is kept; only the key/value tensors are replaced."""
    if isinstance(cache, tuple):  # legacy format of older transformers
        return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)
    picked = copy.copy(cache)
    picked.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        picked.layers.append(layer)
    return picked


def _triangle_cache(cache, step: int, rows_at: list[int]):
    """Prefix cache for a triangular pass of step ``step``: layer i sees a broadcast view of the step's prefix
    for the ``rows_at[i]`` rows that block i runs (materialized by the cache's own concatenation)."""
    picked = copy.copy(cache)
    picked.layers = []
    for i, layer in enumerate(cache.layers):
        layer = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            keys, values = layer.keys[step : step + 1], layer.values[step : step + 1]
            layer.keys = keys.expand(rows_at[i], *keys.shape[1:])
            layer.values = values.expand(rows_at[i], *values.shape[1:])
        picked.layers.append(layer)
    return picked


@contextmanager
def _join_rows(blocks, joining: dict[int, int]) -> Iterator[None]:
    """At block l, append ``joining[l]`` copies of the batch's first row (the clean row) to the batch: the rows
    of layer l enter the pass there, since nothing below l differs from the clean forward in them. Position
    embeddings and masks made for the one input row broadcast over the rows; the hooks are removed in
    ``finally``."""

    def make(n: int):
        def widen(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            wider = torch.cat([hidden, hidden[:1].detach().expand(n, *hidden.shape[1:])])
            if args:
                return (wider, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": wider}

        return widen

    handles = []
    try:
        for layer, n in joining.items():
            handles.append(blocks[layer].register_forward_pre_hook(make(n), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _GoldProbability(torch.autograd.Function):
    """P(gold) [rows] from logits [rows, vocab], with the softmax gradient dP_y/dz = P_y (onehot_y - p) written
    into the saved probabilities in place: the same numbers as autograd's softmax + gather, without the
    three extra [rows, vocab] buffers those allocate (the vocabulary-sized tensors dominate small models)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        gold_prob = probs.gather(1, gold.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(probs, gold, gold_prob)
        ctx.logits_dtype = logits.dtype
        return gold_prob

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        probs, gold, gold_prob = ctx.saved_tensors
        scale = (grad_out * gold_prob).unsqueeze(1)  # [rows, 1]
        grad = probs.mul_(-scale)  # the saved probabilities are not needed again (no double backward)
        grad.scatter_add_(1, gold.unsqueeze(1), scale)
        return grad.to(ctx.logits_dtype), None


def _auto_rows(km: KnModel, seq_len: int, cached: bool, m: int) -> int:
    """Rows per pass from a memory estimate: the activations autograd keeps per token and layer, the logits,
    and (cached) the gathered prefix keys/values; on CPU at most ~_CPU_ROWS (whole multiples of m)."""
    elem = km.value_weight(0).element_size()
    vocab = km.fingerprint()["vocab_size"]
    per_token = km.n_layers * (16 * km.d_model + 4 * km.d_ff) * elem + 3 * vocab * 4
    per_row = per_token if cached else per_token * seq_len
    if cached:
        per_row += (seq_len - 1) * km.n_layers * 2 * km.d_model * elem
    if km.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(km.device)
        budget = int(free * _CUDA_BUDGET_SHARE)
    else:
        budget = _CPU_BUDGET_BYTES
    rows = max(1, min(_MAX_AUTO_ROWS, budget // per_row))
    if km.device.type == "cpu":
        rows = min(rows, max(m, _CPU_ROWS // m * m))
    return rows


@dataclass
class _Group:
    """A group of equally long answer steps and what its passes share. ids [G, seq]; gold, pos, scored [G]
    (scored: the position whose activations are scaled and scored); prefix: the KV cache of every step's
    prefix (None: full-sequence passes); out_index [G]: each step's row of ``scores``."""

    km: KnModel
    ids: torch.Tensor
    gold: torch.Tensor
    pos: torch.Tensor
    scored: torch.Tensor
    prefix: object | None
    cache_kw: str | None
    keep_last: bool
    out_index: torch.Tensor
    scores: torch.Tensor


def _passes(n_steps: int, per_step: int, max_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of a group's passes (rows ordered step, layer, k): whole steps packed together
    where at least two fit, else each step cut into near-equal pieces, so that a pass holding part of a step
    holds no other step (a triangular pass runs one step)."""
    n_rows = n_steps * per_step
    if 2 * per_step <= max_rows:
        per_pass = max_rows // per_step * per_step
        return [(s, min(s + per_pass, n_rows)) for s in range(0, n_rows, per_pass)]
    pieces = -(-per_step // max_rows)
    cuts = [per_step * i // pieces for i in range(pieces + 1)]
    return [(g * per_step + a, g * per_step + b) for g in range(n_steps) for a, b in zip(cuts, cuts[1:])]


def _attribute_group(
    km: KnModel,
    group: list[AnswerStep],
    out_index: torch.Tensor,
    layers: list[int],
    m: int,
    max_rows: int,
    cache_kw: str | None,
    scores: torch.Tensor,
    at_positions: torch.Tensor | None = None,
) -> None:
    """Add ``sum_k w * grad`` of every (step, layer) of a group of equally long steps into ``scores``.
    at_positions [G]: where each step's activations are scored (None: its answer position; full pass only)."""
    device = km.device
    ids = torch.stack([s.input_ids for s in group]).to(device)  # [G, seq]
    pos = torch.tensor([s.position for s in group], device=device)  # [G]
    keep_last = not km.is_masked_lm and keeps_last_logits(km.model)
    prefix = None
    if cache_kw is not None:
        with torch.no_grad():
            # Only the cache is wanted; logits_to_keep spares the vocabulary projection of every prefix token.
            extra = {"logits_to_keep": 1} if keep_last else {}
            prefix = _output_cache(km.model(input_ids=ids[:, :-1], use_cache=True, **extra))
    grp = _Group(km, ids, torch.tensor([s.target_id for s in group], device=device), pos,
                 pos if at_positions is None else at_positions.to(device), prefix, cache_kw, keep_last,
                 out_index.to(device), scores)
    # Rows run step by step, then layer by layer in depth order, then k: a pass usually holds one step's rows
    # for a band of layers (triangular pass); only steps with few rows are packed several to a pass.
    by_depth = torch.tensor(sorted(range(len(layers)), key=lambda j: layers[j]), device=device)
    per_step = len(layers) * m
    for start, end in _passes(len(group), per_step, max_rows):
        r = torch.arange(start, end, device=device)
        g = r // per_step  # step within the group
        li = by_depth[(r % per_step) // m]  # index into `layers`
        alpha = (r % m).float() / m  # k / m
        if bool(g[0] == g[-1]):
            _triangle_pass(grp, int(g[0]), li, alpha, layers)
        else:
            _packed_pass(grp, g, li, alpha, layers)


def _triangle_pass(grp: _Group, step: int, li: torch.Tensor, alpha: torch.Tensor, layers: list[int]) -> None:
    """One pass over rows of one step, ordered by depth (li [R] indexes ``layers``, alpha [R] = k/m). The batch
    starts as the step's clean row alone; the rows of layer l join it at block l as copies of the clean row
    (nothing below l differs in them), so no row runs, forward or backward, below its own layer. The clean row
    rides along to the top, where its logits are dropped."""
    km = grp.km
    device = km.device
    depth = torch.tensor(layers, device=device)[li]  # [R] non-decreasing
    span = {}  # layer -> (first, end): the rows scored at it
    for l in torch.unique(depth).tolist():
        hit = (depth == l).nonzero().squeeze(1)
        span[l] = (int(hit[0]), int(hit[-1]) + 1)
    rows_at = [1 + int((depth <= i).sum()) for i in range(km.n_layers)]  # batch size at each block
    if grp.prefix is not None:
        kwargs = {
            "input_ids": grp.ids[step : step + 1, -1:],  # [1, 1]: only the answer position
            grp.cache_kw: _triangle_cache(grp.prefix, step, rows_at),
            "position_ids": grp.pos[step : step + 1].unsqueeze(1),
            "use_cache": True,
        }
        at, read = 0, 0  # the scored and the read position within the one-token input
    else:
        kwargs = {"input_ids": grp.ids[step : step + 1]}
        at, read = int(grp.scored[step]), int(grp.pos[step])
    if grp.keep_last:
        kwargs["logits_to_keep"] = 1
    leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def replace(layer: int, act: torch.Tensor) -> torch.Tensor | None:
        if layer not in span:
            return None
        a, b = span[layer]
        # The rows that joined at this block are the batch's last; they still hold the clean activation w.
        w = act[1 + a :, at].detach()  # [n, d_ff]
        x = (alpha[a:b].to(act.dtype).unsqueeze(1) * w).requires_grad_(True)
        leaves[layer] = (x, w)
        idx = torch.arange(1 + a, 1 + b, device=act.device)
        return act.index_put((idx, torch.full_like(idx, at)), x)

    blocks = first_submodule(km.model, km.adapter.layers)
    joining = {l: b - a for l, (a, b) in span.items()}
    with value_input_hooks(km.value_projs(list(span)), replace), _join_rows(blocks, joining):
        logits = km.model(**kwargs).logits
    logits = logits[1:, -1] if grp.keep_last else logits[1:, read]
    probs = _GoldProbability.apply(logits, grp.gold[step].repeat(len(li)))
    order = list(leaves)
    grads = torch.autograd.grad(probs.sum(), [leaves[l][0] for l in order], allow_unused=True)
    for layer, grad in zip(order, grads):
        if grad is not None:
            w = leaves[layer][1]
            grp.scores[grp.out_index[step], li[span[layer][0]]] += (w.float() * grad.float()).sum(dim=0)


def _packed_pass(grp: _Group, g: torch.Tensor, li: torch.Tensor, alpha: torch.Tensor, layers: list[int]) -> None:
    """One pass over the rows of several whole steps (g [R]: each row's step), every row from the first block:
    steps with few rows (few layers) fill a pass this way."""
    km = grp.km
    device = km.device
    if grp.prefix is not None:
        row_pos = torch.zeros_like(g)
        kwargs = {
            "input_ids": grp.ids[g, -1:],  # [B, 1]: only the answer position
            grp.cache_kw: _select_cache(grp.prefix, g),
            "position_ids": grp.pos[g].unsqueeze(1),
            "use_cache": True,
        }
        at_pos = row_pos
    else:
        kwargs = {"input_ids": grp.ids[g]}
        row_pos, at_pos = grp.pos[g], grp.scored[g]
    if grp.keep_last:
        kwargs["logits_to_keep"] = 1
    layer_rows = {layers[j]: (li == j).nonzero().squeeze(1) for j in torch.unique(li).tolist()}
    leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def replace(layer: int, act: torch.Tensor) -> torch.Tensor | None:
        idx = layer_rows.get(layer)
        if idx is None:
            return None
        at = at_pos[idx]
        # Nothing below `layer` is altered in these rows, so this is the clean activation w.
        w = act[idx, at].detach()  # [n, d_ff]
        x = (alpha[idx].to(act.dtype).unsqueeze(1) * w).requires_grad_(True)
        leaves[layer] = (x, w)
        return act.index_put((idx, at), x)

    with value_input_hooks(km.value_projs(layers), replace):
        logits = km.model(**kwargs).logits
    logits = logits[:, -1] if grp.keep_last else logits[torch.arange(len(g), device=device), row_pos]
    probs = _GoldProbability.apply(logits, grp.gold[g])
    order = list(leaves)
    grads = torch.autograd.grad(probs.sum(), [leaves[l][0] for l in order], allow_unused=True)
    for layer, grad in zip(order, grads):
        if grad is None:
            continue
        idx = layer_rows[layer]
        w = leaves[layer][1]
        grp.scores.index_put_((grp.out_index[g[idx]], li[idx]), w.float() * grad.float(), accumulate=True)
