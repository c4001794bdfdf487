"""Owned forward hooks on the FFN value projections.

Hooks are registered on ``__enter__`` and exactly our own handles are removed in ``finally``, so an
exception inside the block never leaves a hook behind.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

# fn(layer, activation [batch, seq, d_ff]) -> replacement activation, or None to leave it as is.
ActivationFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@contextmanager
def value_input_hooks(modules: dict[int, nn.Module], fn: ActivationFn) -> Iterator[None]:
    """Route the input of each layer's value projection through ``fn``."""
    handles = []

    def make(layer: int):
        def pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
            out = fn(layer, args[0])
            return None if out is None else (out, *args[1:])

        return pre_hook

    try:
        for layer, module in modules.items():
            handles.append(module.register_forward_pre_hook(make(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
