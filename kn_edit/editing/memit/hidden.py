"""The residual stream after a layer at the subject's last token: MEMIT's h^L, which its target z = h^L + δ and
the residual still missing, z − h^L, are measured in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ...models.hooks import run_until
from ..keyvalue.target import Row, blocks

if TYPE_CHECKING:
    from ...models.model import KnModel


@torch.no_grad()
def hidden_at_subject(km: KnModel, layer: int, rows: Sequence[Row], batch_size: int = 32) -> torch.Tensor:
    """[n_rows, d_model] float64 CPU: the output of block ``layer`` (the residual stream after it) at each row's
    subject position. Rows are cut after the subject's last token (nothing later reaches it, causally) and
    right-padded, so real tokens keep their positions and their states; the forward stops after the block."""
    out = []
    module = blocks(km)[layer]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = km.pad([r.input_ids[: r.subject + 1] for r in chunk])
        at = torch.tensor([r.subject for r in chunk], device=km.device)
        got: dict[str, torch.Tensor] = {}

        def hook(_module, _args, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # [batch, seq, d_model]
            got["h"] = hidden[torch.arange(len(chunk), device=hidden.device), at].to(torch.float64).cpu()

        handle = module.register_forward_hook(hook)
        try:
            run_until(km.model, module, input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
        out.append(got["h"])
    return torch.cat(out)
