"""Owned forward hooks on the FFN value projections, and a forward left as soon as what it reads is computed.

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


class _Reached(Exception):
    """Raised by :func:`run_until`'s hook to leave a forward whose reading is done."""


def run_until(model: nn.Module, module: nn.Module, **inputs) -> None:
    """``model(**inputs)``, left as soon as ``module`` has run and its forward hooks registered before this call
    (e.g. one reading its input or output) have fired: the blocks above it, the final norm and the head are never
    computed. What ``module`` and everything before it compute is the same as in the whole forward."""

    def stop(_module: nn.Module, _args: tuple, _output) -> None:
        raise _Reached

    handle = module.register_forward_hook(stop)
    try:
        model(**inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
