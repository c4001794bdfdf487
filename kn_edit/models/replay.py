"""Blocks below a change, replayed instead of computed.

A change inside block l (an edited weight, a scaled neuron) leaves every block below l computing what it computed
before, so a pass over the same inputs needs to run only from block l on. :func:`keeping` records, for each
forward of the model inside it, the input ids and every block's output; :func:`replaying` then stands a
:class:`_Replay` in for each block below ``below`` that hands back the kept output of the matching forward (the
k-th forward inside ``replaying`` reads the k-th kept one). The model's own forward still runs around them (its
masks, positions, final norm, head), so the logits are bit for bit those of the whole pass.

Where a forward's input ids are not those kept for it (another batch, a different call sequence) or nothing was
kept, the stand-ins run their blocks as usual: replaying is never wrong, only sometimes not faster. The caller
must know that the blocks below ``below`` hold the weights they held while keeping (e.g. nothing was written
since, or only blocks from ``below`` on).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapters import first_submodule

if TYPE_CHECKING:
    from .model import KnModel


@dataclass
class KeptPasses:
    """Per forward of the model, in order: its input ids and attention mask (None: none given) and every block's
    output (None: nothing kept, over the memory budget or blocks whose output this cannot copy)."""

    inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    outputs: list[list] | None = field(default_factory=list)
    bytes: int = 0


def blocks_of(km: KnModel) -> nn.ModuleList | None:
    """The model's transformer blocks as a ModuleList (None: kept another way, then nothing is replayed)."""
    found = first_submodule(km.model, km.adapter.layers)
    return found if isinstance(found, nn.ModuleList) else None


def cloned(output):
    """A block's output (a tensor, or a plain tuple) with its tensors copied, outside any autograd graph (nothing
    below a replayed block takes gradients; a later block may write into its input in place); None for any other
    kind of output."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if type(output) is tuple:
        return tuple(o.detach().clone() if isinstance(o, torch.Tensor) else o for o in output)
    return None


def _size(output) -> int:
    parts = output if type(output) is tuple else (output,)
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


def _inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(input ids, attention mask or None) of a forward call, as given; None without input ids (embeddings given)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None)
    if not isinstance(ids, torch.Tensor):
        return None
    return ids, mask if isinstance(mask, torch.Tensor) else None


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))


@contextmanager
def keeping(km: KnModel, max_bytes: int) -> Iterator[KeptPasses]:
    """Record every forward of ``km.model`` inside: its input ids and each block's output, while they take at
    most ``max_bytes`` (past it, or for a forward without input ids or with an output of another kind, nothing
    is kept: ``outputs`` None)."""
    kept = KeptPasses()
    blocks = blocks_of(km)
    if blocks is None:
        kept.outputs = None
        yield kept
        return

    def start(_module, args, kwargs):
        inputs = _inputs(args, kwargs)
        if kept.outputs is not None and inputs is None:
            kept.outputs = None
        if kept.outputs is not None:  # copies: the caller may reuse its input tensors
            kept.inputs.append(tuple(t.detach().clone() if t is not None else None for t in inputs))
            kept.outputs.append([None] * len(blocks))

    def keep(i: int):
        def hook(_module, _args, output):
            if kept.outputs is None or not kept.outputs:
                return
            copy = cloned(output)
            kept.bytes += _size(output)
            if copy is None or kept.bytes > max_bytes:
                kept.outputs = None
                return
            kept.outputs[-1][i] = copy

        return hook

    handles = [km.model.register_forward_pre_hook(start, with_kwargs=True)]
    handles += [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()
        if kept.outputs is not None and any(o is None for call in kept.outputs for o in call):
            kept.outputs = None  # a forward that did not run every block (an early stop): not replayable


class _Replay(nn.Module):
    """Stands in for a block: hands back the block's kept output (a copy) for the current forward when that
    forward's inputs are the kept ones, else runs the block. Other attributes (e.g. a layer's attention type,
    which some models read) are the block's."""

    def __init__(self, block: nn.Module, index: int, state: dict) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its parameters stay the block's alone
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_state", state)

    def forward(self, *args, **kwargs):
        outputs = self._state.get("outputs")
        if outputs is None:
            return self._block(*args, **kwargs)
        return cloned(outputs[self._index])

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_block"), name)


@contextmanager
def replaying(km: KnModel, kept: KeptPasses | None, below: int) -> Iterator[None]:
    """Blocks ``0 .. below-1`` hand back their ``kept`` outputs of the matching forward (see the module
    docstring); put back in ``finally``. ``below`` 0 or nothing kept: every block runs."""
    blocks = blocks_of(km)
    if blocks is None or kept is None or kept.outputs is None or below <= 0:
        yield
        return
    state: dict = {"next": 0, "outputs": None}
    n = len(kept.inputs)

    def start(_module, args, kwargs):
        # The kept forward with these inputs, looked for from the one after the last match (passes repeat the
        # kept sequence, once per condition or trial), wrapping around.
        inputs, state["outputs"] = _inputs(args, kwargs), None
        if inputs is None:
            return
        for k in ((state["next"] + j) % n for j in range(n)):
            if _equal(inputs[0], kept.inputs[k][0]) and _equal(inputs[1], kept.inputs[k][1]):
                state["outputs"], state["next"] = kept.outputs[k], k + 1
                return

    saved = [blocks[i] for i in range(min(below, len(blocks)))]
    handle = km.model.register_forward_pre_hook(start, with_kwargs=True)
    try:
        for i, block in enumerate(saved):
            blocks[i] = _Replay(block, i, state)
        yield
    finally:
        handle.remove()
        for i, block in enumerate(saved):
            blocks[i] = block


def lowest_block(km: KnModel, names: Sequence[str]) -> int:
    """The lowest block holding one of the named parameters; 0 where one lies outside the blocks (an embedding,
    the final norm) or there are none."""
    blocks = blocks_of(km)
    if blocks is None or not names:
        return 0
    where: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for param in block.parameters():
            where.setdefault(id(param), i)  # a parameter shared by several blocks counts at the lowest
    return min(where.get(id(km.model.get_parameter(name)), 0) for name in names)


__all__ = ["KeptPasses", "blocks_of", "cloned", "keeping", "lowest_block", "replaying"]
