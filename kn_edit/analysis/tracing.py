"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

1. Clean run: record every layer's hidden state (block output), MLP output and attention output.
2. Corrupted runs: add Gaussian noise, ``noise_scale`` × the standard deviation of the word embeddings (3 in the
   paper), to the embeddings of the subject's tokens; ``samples`` noise draws (seeded).
3. Corrupted-with-restoration runs: as 2, but at one layer (or a window of layers around it) and one token
   position, the clean value of the hidden state / MLP output / attention output is put back.

Indirect effect at (layer, position) = mean over noise samples of P(target | corrupted + restored) minus the mean
of P(target | corrupted). P(target) is the probability of the target's first token at the prompt's last position.

All (noise sample, layer, position) runs of a sweep are rows of the same batches (``batch_rows`` per forward pass):
a hook on each layer restores exactly the rows assigned to that layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from ..models.adapters import first_submodule, get_submodule
from ..models.corruption import embeddings_module, make_noise
from ..storage.config import finite
from ..errors import ConfigError, PromptError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from ..models.model import KnModel

KINDS = ("hidden", "mlp", "attn")

# Attention module of a block, per family (the MLP is the parent of the adapter's value projection).
ATTENTION = {"gpt2": "attn", "llama": "self_attn", "gemma3": "self_attn", "gpt_neox": "attention", "gptj": "attn"}


@dataclass
class TraceResult:
    """Indirect effects ``effects[kind]`` [n_layers, n_tokens] (NaN at positions not swept) and the probabilities
    they are computed from."""

    prompt: str
    subject: str
    target: str
    tokens: list[str]
    subject_positions: tuple[int, int]  # [start, end) token range of the subject
    clean_prob: float
    corrupted_prob: float  # mean over noise samples
    effects: dict[str, torch.Tensor]
    noise_std: float
    samples: int
    window: int
    settings: dict = field(default_factory=dict)

    @property
    def last_subject(self) -> int:
        return self.subject_positions[1] - 1

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt, "subject": self.subject, "target": self.target, "tokens": self.tokens,
            "subject_positions": list(self.subject_positions), "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob, "noise_std": self.noise_std, "samples": self.samples,
            "window": self.window, "settings": self.settings,
            "effects": {k: [[None if v != v else v for v in row] for row in e.tolist()] for k, e in self.effects.items()},
        }  # fmt: skip


@dataclass(frozen=True)
class TraceInput:
    input_ids: torch.Tensor  # [seq]
    target_id: int
    subject_positions: tuple[int, int]
    prompt: str


def trace_modules(km: KnModel, kind: str) -> list[torch.nn.Module]:
    """The module whose output is restored, for each layer: the block, its MLP or its attention."""
    if km.is_masked_lm:
        raise UnsupportedArchitectureError("causal tracing needs a causal language model (the prompt's last token "
                                           "predicts the answer); this model is a masked LM")  # fmt: skip
    blocks = first_submodule(km.model, km.adapter.layers)
    if kind == "hidden":
        return list(blocks)
    if kind == "mlp":
        path = km.adapter.value_proj.rsplit(".", 1)[0]
    elif kind == "attn":
        path = ATTENTION.get(km.adapter.family)
        if path is None:
            raise UnsupportedArchitectureError(f"no attention module known for the {km.adapter.family} family")
    else:
        raise ConfigError(f"unknown trace kind {kind!r}: choose from {', '.join(KINDS)}")
    mods = [get_submodule(b, path) for b in blocks]
    if any(m is None for m in mods):
        raise UnsupportedArchitectureError(f"{km.adapter.family}: no module at {path!r} in every block")
    return mods


def subject_span(km: KnModel, prompt: str, subject: str, n_ids: int) -> tuple[int, int]:
    """[start, end) token positions of the first occurrence of ``subject`` in the (encoded) prompt."""
    if not subject or not subject.strip():
        raise PromptError("empty subject")
    at = prompt.find(subject)
    if at < 0:
        raise PromptError(f"subject {subject!r} is not in the prompt {prompt!r} (it must appear exactly, same case)")
    end = at + len(subject)
    tok = km.tokenizer
    if getattr(tok, "is_fast", False):
        offsets = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > at]
        if hit:
            return hit[0], hit[-1] + 1
    # Slow tokenizers: count the tokens of the text up to the subject's start and end.
    start = len(tok(prompt[:at].rstrip(), add_special_tokens=True)["input_ids"]) if prompt[:at].strip() else \
        len(tok("", add_special_tokens=True)["input_ids"])  # fmt: skip
    stop = len(tok(prompt[:end], add_special_tokens=True)["input_ids"])
    if not 0 <= start < stop <= n_ids:
        raise PromptError(f"cannot find the tokens of subject {subject!r} in {prompt!r}")
    return start, stop


def prepare(km: KnModel, prompt: str, subject: str, target: str) -> TraceInput:
    step = km.encode(prompt, target).steps[0]
    encoded_prompt = km.encode(prompt, target).prompt
    ids = step.input_ids[: step.position + 1]
    return TraceInput(ids, step.target_id, subject_span(km, encoded_prompt, subject, len(ids)), encoded_prompt)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


@torch.no_grad()
def clean_run(km: KnModel, inp: TraceInput, kinds: Sequence[str]) -> tuple[float, dict[str, list[torch.Tensor]]]:
    """(P(target) clean, {kind: per layer the clean output [seq, d_model]})."""
    saved: dict[str, list[torch.Tensor | None]] = {k: [None] * km.n_layers for k in kinds}
    handles = []

    def make(kind: str, layer: int):
        def hook(_m, _args, out):
            saved[kind][layer] = _first(out)[0].detach().clone()

        return hook

    try:
        for kind in kinds:
            for layer, mod in enumerate(trace_modules(km, kind)):
                handles.append(mod.register_forward_hook(make(kind, layer)))
        logits = km.model(input_ids=inp.input_ids[None].to(km.device), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    prob = float(torch.softmax(logits[0, -1].float(), dim=-1)[inp.target_id])
    return prob, saved  # type: ignore[return-value]


@torch.no_grad()
def corrupted_probs(
    km: KnModel,
    inp: TraceInput,
    noise: torch.Tensor,
    rows: torch.Tensor,
    kind: str | None,
    clean: list[torch.Tensor] | None,
    batch_rows: int = 256,
) -> torch.Tensor:
    """P(target) [n_rows] of corrupted runs. ``rows`` [n_rows, 4] long: (noise sample, first layer, last layer,
    position) to restore; first layer -1 restores nothing. ``noise`` [samples, n_subject_tokens, d_model]."""
    s0, s1 = inp.subject_positions
    emb = embeddings_module(km)
    modules = trace_modules(km, kind) if kind is not None else []
    out = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows].to(km.device)
        n = len(chunk)
        handles = []

        def corrupt(_m, _args, output):
            output = output.clone()
            output[:, s0:s1] += noise.to(output.device, output.dtype)[chunk[:, 0]]
            return output

        def make(layer: int):
            def restore(_m, _args, output):
                value = _first(output)
                sel = torch.nonzero((chunk[:, 1] <= layer) & (layer <= chunk[:, 2])).flatten()
                if len(sel) == 0:
                    return None
                value = value.clone()
                pos = chunk[sel, 3]
                value[sel, pos] = clean[layer][pos].to(value.dtype)
                return _replace_first(output, value)

            return restore

        try:
            handles.append(emb.register_forward_hook(corrupt))
            for layer, mod in enumerate(modules):
                handles.append(mod.register_forward_hook(make(layer)))
            ids = inp.input_ids[None].expand(n, -1).to(km.device)
            logits = km.model(input_ids=ids, use_cache=False).logits[:, -1].float()
        finally:
            for h in handles:
                h.remove()
        out.append(torch.softmax(logits, dim=-1)[:, inp.target_id].cpu())
    return torch.cat(out)


def trace(
    km: KnModel,
    prompt: str,
    subject: str,
    target: str,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise_scale: float = 3.0,
    seed: int = 0,
    window: int = 1,
    positions: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
    batch_rows: int = 256,
) -> TraceResult:
    """Causal tracing of one prompt (see the module docstring). ``window``: restore the MLP / attention output of
    ``window`` consecutive layers around each layer, [layer - window//2, layer - window//2 + window) clipped (the
    paper uses 10; 1 = the layer alone); hidden states are always restored at one layer. ``positions``: token
    positions to sweep (default all); the others are NaN. ``noise`` [samples, n_subject_tokens, d_model] replaces
    the seeded draw (tests)."""
    if samples < 1 or window < 1 or batch_rows < 1:
        raise ConfigError("samples, window and batch rows must be at least 1")
    finite(noise_scale, "noise_scale")
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"unknown trace kind {kind!r}: choose from {', '.join(KINDS)}")
    inp = prepare(km, prompt, subject, target)
    n_tok = len(inp.input_ids)
    s0, s1 = inp.subject_positions
    if noise is None:
        noise, std = make_noise(km, s1 - s0, samples, noise_scale, seed)
    else:
        std = float("nan")
        if noise.shape != (noise.shape[0], s1 - s0, km.d_model):
            raise ConfigError(f"noise must be [samples, {s1 - s0}, {km.d_model}], got {list(noise.shape)}")
        samples = noise.shape[0]
    positions = list(range(n_tok)) if positions is None else sorted(set(positions))
    if any(not 0 <= p < n_tok for p in positions):
        raise ConfigError(f"positions must lie in 0..{n_tok - 1}")
    clean_prob, clean = clean_run(km, inp, kinds)
    base_rows = torch.tensor([[s, -1, -1, 0] for s in range(samples)], dtype=torch.long)
    corrupted = float(corrupted_probs(km, inp, noise, base_rows, None, None, batch_rows).mean())
    L = km.n_layers
    effects = {}
    for kind in kinds:
        spec = []
        w = 1 if kind == "hidden" else window  # as in the paper: hidden states are restored one layer at a time
        for layer in range(L):
            lo, hi = max(0, layer - w // 2), min(L - 1, layer - w // 2 + w - 1)
            for pos in positions:
                for s in range(samples):
                    spec.append([s, lo, hi, pos])
        probs = corrupted_probs(km, inp, noise, torch.tensor(spec, dtype=torch.long), kind, clean[kind], batch_rows)
        probs = probs.view(L, len(positions), samples).mean(dim=2)
        grid = torch.full((L, n_tok), float("nan"))
        grid[:, positions] = probs - corrupted
        effects[kind] = grid
    tokens = [km.tokenizer.decode([int(t)]) for t in inp.input_ids]
    settings = {"noise_scale": noise_scale, "seed": seed, "positions": positions}
    return TraceResult(inp.prompt, subject, target, tokens, (s0, s1), clean_prob, corrupted, effects, std, samples,
                       window, settings)  # fmt: skip
