"""Plain references shared by the tests of the value-projection editors (ROME, MEMIT, null space): the value
projection's W in one orientation, and its input read with a hook, one text at a time (no padding, no
batching), so that the editors' batched code is checked against the simplest computation."""

from __future__ import annotations

import numpy as np
import torch


def plain_weight(km, layer: int) -> np.ndarray:
    """[d_model, d_ff] float64: the value projection's W, whatever its storage orientation."""
    w = km.value_weight(layer).detach().double().numpy()
    return w.T if km.adapter.value_weight_transposed else w


def set_weight(km, layer: int, value: np.ndarray) -> None:
    """Write W [d_model, d_ff] back in the value projection's storage orientation and dtype."""
    w = torch.from_numpy(value.T if km.adapter.value_weight_transposed else value).to(km.value_weight(layer).dtype)
    with torch.no_grad():
        km.value_weight(layer).copy_(w)


def plain_keys(km, layer: int, texts) -> np.ndarray:
    """[tokens, d_ff]: the value projection's input at every token, one text at a time (no padding)."""
    out = []
    handle = km.value_proj(layer).register_forward_pre_hook(lambda _m, args: out.append(args[0][0].double().numpy()))
    try:
        with torch.no_grad():
            for text in texts:
                ids = km.tokenizer(text, add_special_tokens=True)["input_ids"]
                km.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return np.concatenate(out)


def plain_key(km, layer: int, ids: torch.Tensor, position: int) -> np.ndarray:
    """The value projection's input at one position of one tokenized text, no padding."""
    got = []
    handle = km.value_proj(layer).register_forward_pre_hook(lambda _m, args: got.append(args[0][0, position].double().numpy()))
    try:
        with torch.no_grad():
            km.model(input_ids=ids[None])
    finally:
        handle.remove()
    return got[0]
