"""Content digests of tensors: one way to hash weights, used by every cache key that depends on a model's weights
(key statistics, known facts, attribution scores) and by patch files (a digest per stored tensor)."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensor_bytes(t: torch.Tensor):
    """The tensor's bytes, row-major and native little-endian (as safetensors stores them), without a copy where
    the tensor is already a contiguous CPU tensor."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of one tensor's bytes (the patch file format records it per tensor)."""
    return hashlib.sha256(tensor_bytes(t).tobytes()).hexdigest()


@torch.no_grad()
def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the name, dtype, shape and bytes of each tensor, in the given order (~1 s for 135M fp32)."""
    digest = hashlib.sha256()
    for name, t in named:
        digest.update(f"{name};{t.dtype};{tuple(t.shape)};".encode())
        digest.update(tensor_bytes(t))
    return digest.hexdigest()


__all__ = ["tensor_bytes", "tensor_digest", "weights_digest"]
