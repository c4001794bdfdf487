"""KnModel: a Hugging Face model plus its tokenizer and architecture adapter, with the few operations every
part of kn-edit builds on (encoding prompts, answer-slot probabilities, FFN activations and value vectors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .adapters import ArchitectureAdapter, find_adapter, first_submodule, get_submodule
from ..errors import UnsupportedArchitectureError
from .hooks import value_input_hooks
from .prompts import AnswerStep, EncodedFact, context_length, encode_causal, encode_masked, encode_prompt_only


# Where the edit ledger (kn_edit.editing.ledger) keeps itself: on the Hugging Face module, so that two KnModels
# wrapping one module share it. Named here so that this layer can list active edits without importing editing.
LEDGER_ATTR = "_kn_edit_ledger"


@dataclass(frozen=True)
class Prediction:
    token: str
    token_id: int
    prob: float


class KnModel:
    """A model kn-edit can attribute, probe and edit. Build it with :func:`kn_edit.load` or :func:`kn_edit.wrap`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        adapter: ArchitectureAdapter | None = None,
        name: str | None = None,
        source: str | Path | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter or find_adapter(model)
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        # Directory the weights were read from; saving over it is refused.
        self.source = Path(source).resolve() if source is not None else None
        layers = first_submodule(model, self.adapter.layers)
        if layers is None:
            raise UnsupportedArchitectureError(
                f"{self.adapter.family} adapter: no layer list at {list(self.adapter.layers)} in {type(model).__name__}"
            )
        self._layers = layers
        self._value_projs: list[nn.Module] = []
        for i, layer in enumerate(layers):
            proj = get_submodule(layer, self.adapter.value_proj)
            if proj is None or not hasattr(proj, "weight"):
                raise UnsupportedArchitectureError(
                    f"{self.adapter.family} adapter: layer {i} has no value projection at {self.adapter.value_proj!r}"
                )
            self._value_projs.append(proj)
        embeddings = first_submodule(model, self.adapter.embeddings)
        if embeddings is None:
            raise UnsupportedArchitectureError(
                f"{self.adapter.family} adapter: no word embeddings at {list(self.adapter.embeddings)}"
            )
        self._embeddings = embeddings
        if self.tokenizer.pad_token_id is None and not self.is_masked_lm:
            # Right padding only ever fills positions after the answer, so any id will do.
            self._pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        else:
            self._pad_id = self.tokenizer.pad_token_id or 0

    # ----- shape and modules -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self._value_projs)

    @property
    def d_ff(self) -> int:
        return self._value_projs[0].weight.shape[self.adapter.value_dim]

    @property
    def d_model(self) -> int:
        return self._value_projs[0].weight.shape[1 - self.adapter.value_dim]

    @property
    def is_masked_lm(self) -> bool:
        return self.adapter.masked_lm

    @property
    def device(self) -> torch.device:
        return self._value_projs[0].weight.device

    def value_proj(self, layer: int) -> nn.Module:
        return self._value_projs[layer]

    def value_projs(self, layers: Sequence[int] | None = None) -> dict[int, nn.Module]:
        return {l: self._value_projs[l] for l in (range(self.n_layers) if layers is None else layers)}

    def value_weight(self, layer: int) -> nn.Parameter:
        return self._value_projs[layer].weight

    def value_vectors(self, layer: int) -> torch.Tensor:
        """View [d_ff, d_model] of layer's value vectors; writing to it writes the weight."""
        return self.adapter.as_value_vectors(self._value_projs[layer].weight)

    def input_embedding(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Rows [n, d_model] of the input word-embedding table (unscaled)."""
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
        return self._embeddings.weight[ids.to(self._embeddings.weight.device)]

    def output_embedding(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Rows [n, d_model] of the unembedding (equal to the input embedding where tied)."""
        head = self.model.get_output_embeddings()
        weight = head.weight if head is not None else self._embeddings.weight
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
        return weight[ids.to(weight.device)]

    @property
    def embeddings_tied(self) -> bool:
        head = self.model.get_output_embeddings()
        return head is None or head.weight.data_ptr() == self._embeddings.weight.data_ptr()

    def fingerprint(self) -> dict:
        """What a patch file records to refuse being applied to a different model."""
        return {
            "family": self.adapter.family,
            "model_type": getattr(self.model.config, "model_type", None),
            "n_layers": self.n_layers,
            "d_ff": self.d_ff,
            "d_model": self.d_model,
            "vocab_size": int(self._embeddings.weight.shape[0]),
        }

    # ----- prompts -----------------------------------------------------------------------------------
    def encode(self, prompt: str, target: str) -> EncodedFact:
        enc = encode_masked if self.is_masked_lm else encode_causal
        return enc(self.tokenizer, prompt, target, context_length(self.model))

    def pad(self, sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad 1-D id tensors: (input_ids, attention_mask), both [batch, seq], on the model's device.
        Right padding keeps every real token's position, so no position_ids are needed."""
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def step_logits(self, steps: Sequence[AnswerStep], batch_size: int = 64) -> torch.Tensor:
        """Logits [n_steps, vocab] at each step's answer position (float32)."""
        out = []
        head = self.model.get_output_embeddings()
        for start in range(0, len(steps), batch_size):
            chunk = steps[start : start + batch_size]
            ids, mask = self.pad([s.input_ids for s in chunk])
            rows = torch.arange(len(chunk), device=ids.device)
            pos = torch.tensor([s.position for s in chunk], device=ids.device)
            if head is None:
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                out.append(logits[rows, pos].float())
                continue
            # Only the answer positions reach the output head: the vocabulary projection of every other position
            # (a fifth of smollm2's compute per token, most of gemma3's 262k-word head) would be thrown away.
            # What follows the head in the families' forward (Gemma's logit soft-capping) is per position.
            def answer_rows(module, args):
                hidden, *rest = args
                return (hidden[rows, pos][:, None], *rest)

            handle = head.register_forward_pre_hook(answer_rows)
            try:
                logits = self.model(input_ids=ids, attention_mask=mask).logits  # [batch, 1, vocab]
            finally:
                handle.remove()
            out.append(logits[:, 0].float())
        return torch.cat(out)

    def step_log_probs(self, steps: Sequence[AnswerStep]) -> torch.Tensor:
        """log P(target_id) [n_steps] of each step."""
        logp = torch.log_softmax(self.step_logits(steps), dim=-1)
        gold = torch.tensor([s.target_id for s in steps], device=logp.device)
        return logp[torch.arange(len(steps), device=logp.device), gold].cpu()

    def log_prob(self, prompt: str, target: str) -> float:
        """log P(target | prompt), summed over the target's teacher-forced tokens."""
        return float(self.step_log_probs(self.encode(prompt, target).steps).sum())

    def prob(self, prompt: str, target: str) -> float:
        """P(target | prompt): the product of its tokens' teacher-forced probabilities."""
        return float(torch.exp(torch.tensor(self.log_prob(prompt, target))))

    def predict(self, prompt: str, top_k: int = 10) -> list[Prediction]:
        """The top_k next tokens (or mask fillers) at the prompt's answer slot."""
        ids, pos = encode_prompt_only(self.tokenizer, prompt, self.is_masked_lm, context_length(self.model))
        step = AnswerStep(ids, pos, -1)
        probs = torch.softmax(self.step_logits([step])[0], dim=-1)
        values, indices = probs.topk(top_k)
        return [
            Prediction(self.tokenizer.decode([int(i)]), int(i), float(v)) for v, i in zip(values.cpu(), indices.cpu())
        ]

    @torch.no_grad()
    def activations(self, steps: Sequence[AnswerStep], layers: Sequence[int] | None = None) -> torch.Tensor:
        """FFN neuron activations (value-projection inputs) at each step's answer position:
        [n_steps, n_layers_selected, d_ff], float32 on CPU."""
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        ids, mask = self.pad([s.input_ids for s in steps])
        rows = torch.arange(len(steps), device=self.device)
        pos = torch.tensor([s.position for s in steps], device=self.device)
        captured: dict[int, torch.Tensor] = {}

        def capture(layer: int, act: torch.Tensor) -> None:
            captured[layer] = act[rows, pos].float().cpu()

        with value_input_hooks(self.value_projs(layers), capture):
            self.model(input_ids=ids, attention_mask=mask)
        return torch.stack([captured[l] for l in layers], dim=1)

    @property
    def active_edits(self) -> list:
        """The edits (kn_edit.editing.Edit) applied to this model and not reverted, oldest first."""
        ledger = self.model.__dict__.get(LEDGER_ATTR)
        return ledger.active_edits if ledger is not None else []

    def save(self, path: str | Path) -> Path:
        """Write this model (with its active edits) to the new folder ``path``; see kn_edit.models.saving."""
        from .saving import save_model

        return save_model(self, path)

    def __repr__(self) -> str:
        return (
            f"KnModel({self.name!r}, family={self.adapter.family}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, d_ff={self.d_ff})"
        )
