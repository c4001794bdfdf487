"""Generic-neuron filters. Attribution also finds neurons that serve every prompt of a kind (in smollm2-135m,
layer-0 detectors of the prompt's last word, " is" or " of", show up for almost every fact); they are not
knowledge of this fact and editing them damages everything. Two filters:

* **relation share** (the paper, for updates): drop neurons located for more than ``max_share`` (10 %) of the
  relation's facts. Needs the neurons of the relation's other facts.
* **generic text**: drop neurons that fire on generic answer-slot prompts (no subject, no fact: "The colour of
  the car is") about as strongly as on the fact's own prompts: the ``quantile`` (0.75) of |a_i| over the
  generic prompts at their answer slot ≥ ``ratio`` (0.5) × mean |a_i| over the fact's prompts at its answer
  step. A quantile rather than the mean, because a detector of the last word (" is") fires on a third of the
  generic prompts only and the mean would dilute it. Needs one forward pass over the generic prompts, once per
  weight state (kn_edit.editing.memo).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from ..errors import ConfigError
from ..models.neurons import Neuron
from ..models.prompts import AnswerStep, encode_prompt_only
from .memo import memoized

if TYPE_CHECKING:
    from ..models.model import KnModel

# Answer-slot prompts without a subject: templates of common relations and everyday sentences. A neuron that
# fires as much here as on "The capital of France is" is about the form of the prompt, not about France.
GENERIC_PROMPTS = (
    "The weather today is",
    "My favourite colour is",
    "The name of my dog is",
    "The meeting will take place in",
    "She put the keys in the",
    "The price of the ticket is",
    "I would like a cup of",
    "The best way to learn is",
    "Our next holiday will be in",
    "The answer to the question is",
    "They decided to meet at the",
    "The book was written by",
    "The film is about",
    "Her brother works as a",
    "The colour of the car is",
    "We bought the house from",
    "The game was played in",
    "His first language is",
    "The company was founded in",
    "This dish comes from",
    "The letter was sent to",
    "The city is located in",
    "The capital of the region is",
    "The team plays in the",
)


def relation_counts(neuron_sets: Sequence[Iterable[Neuron]]) -> Counter:
    """How many of the sets (one per fact of a relation) contain each neuron."""
    counts: Counter = Counter()
    for found in neuron_sets:
        counts.update(set(found))
    return counts


def shared_by(neuron_sets: Sequence[Iterable[Neuron]], share: float) -> list[Neuron]:
    """Neurons in at least ``share`` of the sets (the paper's relation-level knowledge neurons, share 0.1)."""
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"share must be in (0, 1], got {share}")
    counts = relation_counts(neuron_sets)
    return sorted(n for n, c in counts.items() if c >= share * len(neuron_sets) - 1e-9)


def drop_relation_shared(
    neurons: Sequence[Neuron], neuron_sets: Sequence[Iterable[Neuron]], max_share: float = 0.1
) -> tuple[list[Neuron], list[Neuron]]:
    """(kept, dropped): dropped are the neurons in more than ``max_share`` of the relation's sets."""
    if not 0.0 < max_share <= 1.0:
        raise ConfigError(f"relation_share must be in (0, 1], got {max_share}")
    counts = relation_counts(neuron_sets)
    limit = max_share * len(neuron_sets)
    kept = [n for n in neurons if counts[n] <= limit + 1e-9]
    return kept, [n for n in neurons if counts[n] > limit + 1e-9]


def with_slot(km: KnModel, prompt: str) -> str:
    """The prompt with an answer slot: masked LMs get " [MASK]." appended where it has none."""
    if km.is_masked_lm and km.tokenizer.mask_token not in prompt and "[Y]" not in prompt and "[MASK]" not in prompt:
        return prompt + " [MASK]."
    return prompt


def slot_activations(km: KnModel, prompts: Sequence[str], quantile: float = 0.75) -> torch.Tensor:
    """The ``quantile`` over the prompts of |a| at the answer slot of answer-slot prompts (masked LMs:
    " [MASK]." is appended where missing): [n_layers, d_ff], float32 CPU."""
    if not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"generic_quantile must be in [0, 1], got {quantile}")
    prompts = tuple(prompts)

    def compute() -> torch.Tensor:
        steps = [AnswerStep(*encode_prompt_only(km.tokenizer, with_slot(km, p), km.is_masked_lm), -1) for p in prompts]
        return km.activations(steps).abs().quantile(quantile, dim=0)

    return memoized(km, "slot_activations", (prompts, quantile), compute)  # the same for every edit of these weights


def drop_generic(
    neurons: Sequence[Neuron], fact_activation: torch.Tensor, generic_activation: torch.Tensor, ratio: float
) -> tuple[list[Neuron], list[Neuron]]:
    """(kept, dropped). fact_activation [n] (mean |a_i| on the fact's prompts, neurons' order),
    generic_activation [n_layers, d_ff] (slot_activations); a neuron is dropped when generic ≥ ratio × fact."""
    if ratio <= 0:
        raise ConfigError(f"generic_ratio must be > 0, got {ratio}")
    kept, dropped = [], []
    for n, fact in zip(neurons, fact_activation.tolist()):
        (dropped if float(generic_activation[n.layer, n.index]) >= ratio * fact else kept).append(n)
    return kept, dropped
