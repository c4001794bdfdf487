"""Key statistics for rank-one (ROME) and mass (MEMIT) editing: the uncentred second moment C = E[k kᵀ] of
layer l's value-projection input k (the FFN's post-activation hidden, [d_ff]) over the tokens of generic text.

Computed once per (weights, layer, corpus, sample size, passage length) and cached on disk as safetensors
under ``$KN_EDIT_CACHE/rome/key_statistics`` (or a given folder). The cache key holds a digest of the weights
the keys depend on: the embeddings and every parameter of layers 0..l except layer l's value projection itself
(and everything outside the layer list, to be safe). So statistics stay valid while that value projection is
edited (ROME's own updates, knowledge-neuron edits of the same layer) and are recomputed when anything below
it changes. The forward pass stops at layer l, so the cost grows with l, not with the model's depth. Once read,
they are also kept on the model while its weights stay the same (kn_edit.editing.ledger.weights_state), so an
evaluation that edits and reverts fact after fact neither hashes the weights nor reads the file again, and the
factorization of C each solve needs (``KeyStatistics.memo``) is made once.

Other subjects' keys (:func:`subject_statistics`, off unless asked for): the key at the last token of each of many
names (``wikipedia``: the key slice's article titles; or a file of names) after each context prefix, as k* is taken,
kept as their second moment C_subjects (the metric C + β·C_subjects, ``cov_subjects`` β) and as each name's mean key
(kn_edit.editing.keyvalue.nearest). Cached beside the key statistics, the file named by the prefixes' digest too.

Corpus ``wikipedia``: the key slice of the Wikipedia extracts (kn_edit/data/text.py), disjoint from the
held-out passages perplexity is measured on. Passages are cut at ``max_length`` tokens and taken in order
until ``n_tokens`` tokens are reached (the last one cut to fit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ...models.adapters import first_submodule
from ...errors import DataError
from ...models.hooks import run_until, value_input_hooks
from ...storage.digest import weights_digest
from ...storage.atomic import atomic_file
from ...progress import NullReporter, Reporter
from ...models.prompts import encode_heads
from ..ledger import weights_state

if TYPE_CHECKING:
    from ...models.model import KnModel

WIKIPEDIA = "wikipedia"
_FORMAT = 1  # bump when the file layout or the way statistics are taken changes
_SUBJECTS_FORMAT = 2  # the same for the subjects' keys (2: each name's mean key kept too)


# Where the model keeps statistics read or computed: {(layer, corpus, tokens, length, folder): (weights state, them)}.
_STATISTICS_ATTR = "_kn_edit_key_statistics"


@dataclass
class KeyStatistics:
    """C = E[k kᵀ] of one layer's keys. mom2 [d_ff, d_ff] float32 (CPU); mean [d_ff] float32."""

    layer: int
    mom2: torch.Tensor
    mean: torch.Tensor
    n_tokens: int
    corpus: str
    from_cache: bool
    seconds: float  # computing (or reading) them
    path: str | None = None
    # what is derived from mom2 once for every edit: ("null space", threshold) and ("lu", ridge) (the
    # factorization of kn_edit.editing.keyvalue.solve); shared by the copies the model keeps handing out
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def null_space(self, threshold: float):
        """The null space of mom2 at ``threshold`` (kn_edit.editing.nullspace), computed once per statistics
        object: an eigendecomposition of [d_ff, d_ff] that every edit of a sequence would repeat otherwise."""
        from ..nullspace import null_space

        if ("null space", threshold) not in self.memo:
            self.memo["null space", threshold] = null_space(self.mom2, threshold)
        return self.memo["null space", threshold]


def key_weights_digest(km: KnModel, layer: int) -> str:
    """The digest (kn_edit.storage.digest) of the parameters layer's keys depend on (see the module docstring), by name, dtype, shape."""
    blocks = first_submodule(km.model, km.adapter.layers)
    later = {id(p) for block in list(blocks)[layer + 1 :] for p in block.parameters()}
    proj = km.value_proj(layer)
    later |= {id(p) for p in proj.parameters()}
    return weights_digest((name, p) for name, p in km.model.named_parameters() if id(p) not in later)


def corpus_id(corpus: str, texts: Sequence[str] | None) -> str:
    """A short name of the text, for the cache key (texts and files by the hash of their content)."""
    if texts is not None:
        return "texts-" + hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()[:12]
    if corpus == WIKIPEDIA:
        return "wikipedia-keyslice"
    path = Path(corpus)
    if not path.is_file():
        raise DataError(f"covariance corpus {corpus!r} is neither 'wikipedia' nor a text file")
    return f"file-{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)[:32]}-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def corpus_texts(corpus: str) -> list[str]:
    from ...data.text import text_file_passages, wiki_key_passages

    return wiki_key_passages() if corpus == WIKIPEDIA else text_file_passages(corpus)


def cache_path(km: KnModel, layer: int, corpus: str, n_tokens: int, max_length: int, cache_dir: str | Path | None) -> Path:
    from ...models.provision import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "rome"
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(km.name)).name)[:48] or "model"
    digest = key_weights_digest(km, layer)
    return root / "key_statistics" / f"{tag}-{digest[:16]}" / f"layer{layer}-{corpus}-{n_tokens}tok-len{max_length}-v{_FORMAT}.safetensors"


def token_batches(km: KnModel, texts: Sequence[str], n_tokens: int, max_length: int, batch_size: int) -> list[list[torch.Tensor]]:
    """Passages as id tensors (cut at max_length; the last one cut so the total is at most n_tokens), in
    batches. Fewer tokens when the text runs out."""
    seqs, total = [], 0
    for text in texts:
        ids = encode_heads(km.tokenizer, [text], max_length, add_special_tokens=True)["input_ids"][0]
        ids = ids[: n_tokens - total]
        if len(ids) < 2:
            if total >= n_tokens:
                break
            continue
        seqs.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if total >= n_tokens:
            break
    return [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]


@torch.no_grad()
def compute_statistics(km: KnModel, layer: int, batches: Sequence[Sequence[torch.Tensor]], reporter: Reporter) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Σ k kᵀ [d_ff, d_ff] float64, Σ k [d_ff] float64, token count) over every real token of the batches."""
    d = km.d_ff
    mom2 = torch.zeros(d, d, dtype=torch.float64, device=km.device)
    total = torch.zeros(d, dtype=torch.float64, device=km.device)
    count = 0
    with reporter.task(f"key statistics of layer {layer}", total=sum(len(s) for b in batches for s in b)) as task:
        for batch in batches:
            ids, mask = km.pad(list(batch))
            got: dict[str, torch.Tensor] = {}

            def capture(_layer: int, act: torch.Tensor) -> None:  # act [batch, seq, d_ff]
                got["k"] = act[mask.bool()].to(torch.float64)  # [tokens, d_ff]

            with value_input_hooks({layer: km.value_proj(layer)}, capture):  # nothing above the layer is needed
                run_until(km.model, km.value_proj(layer), input_ids=ids, attention_mask=mask, use_cache=False)
            keys = got["k"]
            mom2 += keys.T @ keys
            total += keys.sum(dim=0)
            count += int(keys.shape[0])
            task.advance(int(keys.shape[0]))
    return mom2.cpu(), total.cpu(), count


def key_statistics(km: KnModel, layer: int, texts: Sequence[str] | None = None, *, corpus: str = WIKIPEDIA,
                   n_tokens: int = 50000, max_length: int = 128, batch_size: int = 16,
                   cache: bool = True, cache_dir: str | Path | None = None,
                   reporter: Reporter | None = None) -> KeyStatistics:
    """C = E[k kᵀ] of ``layer``'s keys over ``texts`` (given) or ``corpus`` (``wikipedia`` or a text file),
    read from the cache when there (see the module docstring)."""
    reporter = reporter or NullReporter()
    name = corpus_id(corpus, texts)
    start = time.perf_counter()
    held = km.model.__dict__.setdefault(_STATISTICS_ATTR, {}) if cache else {}
    key, state = (layer, name, n_tokens, max_length, str(cache_dir)), weights_state(km)
    if key in held and held[key][0] == state:  # what reading the cache file again would give
        return dataclasses.replace(held[key][1], from_cache=True, seconds=time.perf_counter() - start)
    path = cache_path(km, layer, name, n_tokens, max_length, cache_dir) if cache else None
    if path is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mom2, mean = f.get_tensor("mom2"), f.get_tensor("mean")
        held[key] = (state, KeyStatistics(layer, mom2, mean, int(meta.get("n_tokens", 0)), name, True,
                                          time.perf_counter() - start, str(path)))
        return held[key][1]
    source = list(texts) if texts is not None else corpus_texts(corpus)
    batches = token_batches(km, source, n_tokens, max_length, batch_size)
    if not batches:
        raise DataError(f"no text to take key statistics from (corpus {name})")
    sums, total, count = compute_statistics(km, layer, batches, reporter)
    # Rounded to float32 before use, so a first run and a cached rerun edit identically.
    mom2, mean = (sums / count).float(), (total / count).float()
    if path is not None:
        from safetensors.torch import save_file

        meta = {"n_tokens": str(count), "layer": str(layer), "corpus": name, "model": str(km.name),
                "max_length": str(max_length), "requested_tokens": str(n_tokens), "format": str(_FORMAT)}
        with atomic_file(path, overwrite=True) as tmp:
            save_file({"mom2": mom2.contiguous(), "mean": mean.contiguous()}, str(tmp), metadata=meta)
    stats = KeyStatistics(layer, mom2, mean, count, name, False, time.perf_counter() - start,
                          str(path) if path is not None else None)
    held[key] = (state, stats)
    return stats


def subject_names(source: str, count: int) -> list[str]:
    """The first ``count`` names of ``source``: ``wikipedia`` (the key slice's article titles,
    kn_edit.data.text.wiki_key_names) or a UTF-8 file with one name per line."""
    from ...data.text import text_file_names, wiki_key_names

    return (wiki_key_names() if source == WIKIPEDIA else text_file_names(source))[:count]


@torch.no_grad()
def subject_moment(km: KnModel, layer: int, names: Sequence[str], prefixes: Sequence[str], batch_size: int = 64,
                   reporter: Reporter | None = None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(Σ k kᵀ [d_ff, d_ff] float64, n, each name's mean key [len(names), d_ff] float64): k the layer's key at the
    last token of each name after each prefix ("{prefix}. {name}"; the empty prefix: the name alone), the texts k*
    is averaged over for a subject."""
    from .keys import keys_at, subject_texts

    texts = [(i, t) for i, name in enumerate(names) for t in subject_texts(km, name, [], prefixes, whole_subject=True)]
    texts.sort(key=lambda it: len(it[1].input_ids))  # batches of equal lengths: little padding
    d = km.d_ff
    sums = torch.zeros(d, d, dtype=torch.float64)
    means = torch.zeros(len(names), d, dtype=torch.float64)
    reporter = reporter or NullReporter()
    with reporter.task(f"subject keys of layer {layer}", total=len(texts)) as task:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            keys = keys_at(km, layer, [t for _, t in chunk], batch_size).to(torch.float64)
            sums += keys.T @ keys
            means.index_add_(0, torch.tensor([i for i, _ in chunk]), keys / len(prefixes))
            task.advance(len(keys))
    return sums, len(texts), means


@dataclass(frozen=True)
class SubjectStatistics:
    """What other subjects' keys give the key-value editors (:func:`subject_statistics`)."""

    names: tuple[str, ...]
    moment: torch.Tensor  # C_subjects = E[k kᵀ] over every name after every prefix [d_ff, d_ff] float32
    keys: torch.Tensor  # each name's key averaged over the prefixes, as k* is [len(names), d_ff] float32


def subject_statistics(km: KnModel, layer: int, source: str, count: int, prefixes: Sequence[str], *,
                       cache: bool = True, cache_dir: str | Path | None = None,
                       reporter: Reporter | None = None) -> SubjectStatistics:
    """The keys of ``count`` names of ``source`` after each of ``prefixes`` (:func:`subject_moment`), cached like
    the key statistics (the file name holds the prefixes' digest: they are sampled from the whole model, which the
    weights digest of the layers below does not cover)."""
    start = time.perf_counter()
    if source != WIKIPEDIA and not Path(source).is_file():
        raise DataError(f"names file not found: {source} (cov_subject_names: 'wikipedia' or a file, one name a line)")
    source_id = "names-" + corpus_id(source, None).replace("wikipedia-keyslice", "wikipedia-titles")
    prefix_digest = hashlib.sha256("\n\x00".join(prefixes).encode()).hexdigest()[:12]
    held = km.model.__dict__.setdefault(_STATISTICS_ATTR, {}) if cache else {}
    key, state = ("subjects", layer, source_id, count, prefix_digest, str(cache_dir)), weights_state(km)
    if key in held and held[key][0] == state:
        return held[key][1]
    names = tuple(subject_names(source, count))
    path = None
    if cache:
        folder = cache_path(km, layer, source_id, count, 0, cache_dir).parent
        path = folder / f"layer{layer}-subjects-{source_id}-{count}-p{prefix_digest}-v{_SUBJECTS_FORMAT}.safetensors"
    if path is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            moment, keys = f.get_tensor("mom2"), f.get_tensor("keys")
    else:
        sums, n, means = subject_moment(km, layer, names, prefixes, reporter=reporter)
        # float32 before use, so a first run and a cached rerun edit identically
        moment, keys = (sums / n).float(), means.float()
        if path is not None:
            from safetensors.torch import save_file

            meta = {"n_keys": str(n), "n_names": str(len(names)), "layer": str(layer), "names": source_id,
                    "model": str(km.name), "prefixes": prefix_digest, "format": str(_SUBJECTS_FORMAT),
                    "seconds": f"{time.perf_counter() - start:.1f}"}
            with atomic_file(path, overwrite=True) as tmp:
                save_file({"mom2": moment.contiguous(), "keys": keys.contiguous()}, str(tmp), metadata=meta)
    found = SubjectStatistics(names, moment, keys)
    held[key] = (state, found)
    return found


def subjects_for(km: KnModel, layer: int, settings, reporter: Reporter | None = None) -> SubjectStatistics:
    """:func:`subject_statistics` as a key-value editor's settings ask for them (cov_subject_*, prefixes, cache)."""
    from .keys import context_prefixes

    s = settings
    prefixes = context_prefixes(km, s.n_prefixes, s.prefix_length, s.prefix_top_k, s.prefix_seed)
    return subject_statistics(km, layer, s.cov_subject_names, s.cov_subject_count, prefixes, cache=s.cache,
                              cache_dir=s.cache_dir, reporter=reporter)


def statistics_for(km: KnModel, layer: int, settings, key_texts: Sequence[str] | None = None,
                   reporter: Reporter | None = None) -> KeyStatistics:
    """:func:`key_statistics` of ``layer`` as a key-value editor's settings (KeyValueSettings' cov_* and cache
    fields) ask for them; ``key_texts`` replace the corpus (tests, benchmarks). With ``cov_subjects`` β > 0 the
    metric is C + β·C_subjects (:func:`subject_statistics`), held with its own memo of factorizations."""
    s = settings
    stats = key_statistics(km, layer, key_texts, corpus=s.cov_corpus, n_tokens=s.cov_tokens,
                           max_length=s.cov_max_length, batch_size=s.cov_batch_size, cache=s.cache,
                           cache_dir=s.cache_dir, reporter=reporter)
    beta = s.cov_subjects
    if not beta:
        return stats
    start = time.perf_counter()
    subjects = subjects_for(km, layer, s, reporter).moment
    held = km.model.__dict__.setdefault(_STATISTICS_ATTR, {}) if s.cache else {}
    key = ("with subjects", layer, stats.corpus, s.cov_tokens, s.cov_max_length, str(s.cache_dir),
           s.cov_subject_names, s.cov_subject_count, float(beta))
    state = weights_state(km)  # (the prefixes, and so the subjects' keys, change only with it)
    if key not in held or held[key][0] != state:  # summed once, so its factorizations (memo) serve every edit
        held[key] = (state, dataclasses.replace(stats, mom2=stats.mom2 + float(beta) * subjects, memo={},
                                                corpus=f"{stats.corpus} + {float(beta):g}·subjects"))
    return dataclasses.replace(held[key][1], from_cache=stats.from_cache,
                               seconds=stats.seconds + time.perf_counter() - start)
