"""Where an edit reaches other prompts: at which of their tokens the edited layer's output moves, and by how much.

A key-value edit (ROME, kn-subject, MEMIT's last layer, ...) changes a layer's output by δ at the keys it was fitted
to; any other token whose key shares them moves too. For each prompt, the change of the layer's output at every token
(edited model against unedited, the same forward otherwise) divided by ‖δ‖, and the prompt's top-1 answer before and
after. A neighbour whose answer flips with a large share at its own subject's token is reached through its subject's
key; a large share at the last token would be the relation's (evaluations/README.md, "where the same-object
neighbours are lost").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import EditError
from ..models.prompts import encode_prompt_only

if TYPE_CHECKING:
    from ..editing.base import Editor, EditRequest
    from ..editing.ledger import Edit
    from ..models.model import KnModel


@dataclass(frozen=True)
class PromptReach:
    prompt: str
    tokens: tuple[str, ...]
    shares: tuple[float, ...]  # ‖Δ output‖ / ‖δ‖ at each token (BOS included where the tokenizer adds one)
    before: str  # top-1 next token before the edit ...
    after: str  # ... and with it

    @property
    def flipped(self) -> bool:
        return self.before != self.after

    def strongest(self, n: int = 3) -> list[tuple[int, str, float]]:
        """The ``n`` tokens whose output moved most: (position, token, share), largest first."""
        order = sorted(range(len(self.shares)), key=lambda i: -self.shares[i])[:n]
        return [(i, self.tokens[i], self.shares[i]) for i in order]


@torch.no_grad()
def layer_outputs(km: KnModel, layer: int, prompt: str) -> tuple[torch.Tensor, list[str], str]:
    """(the value projection's output at every token [seq, d_model] float64, the tokens, the top-1 next token)."""
    ids = encode_prompt_only(km.tokenizer, prompt, km.is_masked_lm)[0]
    got: dict[str, torch.Tensor] = {}
    handle = km.value_proj(layer).register_forward_hook(lambda _m, _a, out: got.__setitem__("out", out[0]))
    try:
        logits = km.model(input_ids=ids[None].to(km.device)).logits[0, -1]
    finally:
        handle.remove()
    tokens = [km.tokenizer.decode([int(i)]) for i in ids]
    return got["out"].to(torch.float64).cpu(), tokens, km.tokenizer.decode([int(logits.argmax())])


def edit_reach(km: KnModel, editor: Editor, request: EditRequest, prompts: Sequence[str]) -> tuple[Edit, list[PromptReach]]:
    """Measure ``prompts`` on the unedited model, apply ``editor``'s edit of ``request`` (one edited layer: ROME,
    kn-subject), measure them again, and return the edit (still applied: the caller reverts it) with each prompt's
    reach."""
    choose = getattr(editor.settings, "choice_for", None)
    layers = choose(km).layers if choose is not None else ()
    if len(layers) != 1:
        raise EditError(f"{editor.name}: edit_reach needs an editor of one layer (rome, kn-subject)")
    layer = layers[0]
    before = {p: layer_outputs(km, layer, p) for p in prompts}
    edit = editor.apply(km, [request])
    found = edit.report.details.requests
    norm = max(float(found[0].delta_norm), 1e-12)
    out = []
    for prompt in prompts:
        after, tokens, top = layer_outputs(km, layer, prompt)
        shares = ((after - before[prompt][0]).norm(dim=-1) / norm).tolist()
        out.append(PromptReach(prompt, tuple(tokens), tuple(shares), before[prompt][2], top))
    return edit, out
