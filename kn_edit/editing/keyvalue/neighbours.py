"""Other subjects' answers kept in v*'s objective, with the finished update's reach on them simulated.

A least-change update that moves the edited keys by δ, ΔW = δ wᵀ, moves the layer's output at any token of any
text by (wᵀk_t) δ, k_t that token's key: w (kn_edit.editing.keyvalue.solve) depends on the keys and C, not on δ,
so it is known before δ is optimised. Adding (wᵀk_t) δ at every token of another subject's prompt therefore gives,
for each δ tried, exactly that prompt's logits after the edit. kn-subject's ``nearest_kl`` puts the edit prompts
about the names an update for this subject would move most (the largest shares wᵀk̄ among ``cov_subject_names``,
k̄ a name's key after the context prefixes) into the objective, with the KL of their answers against the unedited
model's: δ is asked to make the new object this subject's answer while leaving theirs where the update reaches
them. It costs one more forward and backward per step, of those prompts (kn_edit.editing.keyvalue.target
.neighbour_logits), which is one reason it is off by default (evaluations/README.md, "nearest_kl").
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ...models.prompts import encode_prompt_only
from ..preserve import layer_token_activations
from .nearest import ranked_names, substituted
from .statistics import SubjectStatistics

if TYPE_CHECKING:
    from ...models.model import KnModel


@dataclass(frozen=True)
class NeighbourRows:
    """Other prompts for v*'s objective: ids and mask [n, seq] (right-padded), the share of δ the update gives
    each token's output [n, seq] (0 on padding), and each prompt's answer position [n]."""

    texts: tuple[str, ...]
    input_ids: torch.Tensor
    mask: torch.Tensor
    shares: torch.Tensor
    last: torch.Tensor


def neighbour_rows(km: KnModel, layer: int, texts: Sequence[str], direction: torch.Tensor) -> NeighbourRows:
    """``texts`` as rows whose every token's output gets the share wᵀk_t of δ, w = ``direction`` [d_ff] (zero
    outside the edited neurons)."""
    encoded = [encode_prompt_only(km.tokenizer, t, km.is_masked_lm) for t in texts]
    ids, mask = km.pad([ids for ids, _ in encoded])
    keys = layer_token_activations(km, ids, mask, [layer])[layer]  # [real tokens, d_ff]
    shares = torch.zeros(mask.shape)  # 0 on padding
    shares[mask.cpu().bool()] = (keys.to(torch.float64) @ direction.to(torch.float64)).float()
    last = torch.tensor([position for _, position in encoded], dtype=torch.long)
    return NeighbourRows(tuple(texts), ids, mask, shares.to(km.device), last.to(km.device))


def nearest_answer_rows(km: KnModel, layer: int, found: SubjectStatistics, direction: torch.Tensor, subject: str,
                        prompts: Sequence[str], count: int) -> tuple[list[str], NeighbourRows | None]:
    """(names, their rows): the ``count`` names of ``found`` whose keys (after the context prefixes) get the
    largest share of δ from ``direction`` [d_ff] (kn_edit.editing.keyvalue.nearest.ranked_names, with no upper
    bound: a name the update reaches more than the subject is the first to keep), each in every edit prompt in
    the subject's place."""
    share = found.keys.to(torch.float64) @ direction.to(torch.float64)
    names = [found.names[i] for i in ranked_names(found.names, share, subject, count, max_share=None)]
    texts = [substituted(p, subject, name) for name in names for p in prompts]
    return names, (neighbour_rows(km, layer, texts, direction) if texts else None)


@contextmanager
def spread_output(module: torch.nn.Module, shares: torch.Tensor, delta: torch.Tensor) -> Iterator[None]:
    """Add shares[b, t] · δ to ``module``'s output [batch, seq, d_model] at every token."""

    def hook(_module, _args, out: torch.Tensor) -> torch.Tensor:
        return out + shares[..., None].to(out.dtype) * delta.to(out.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def neighbour_kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(P_original ‖ P_edited) at each row's answer position; logits [n, vocab], reference
    the unedited log-probabilities [n, vocab]. This direction weighs most what the unedited model expected there,
    its answer, which is what an edit of another subject should leave."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - logp)).sum(dim=-1).mean()
