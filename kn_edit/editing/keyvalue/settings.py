"""The settings every key-value editor shares (ROME, MEMIT, kn-subject): how the subject's key is taken, how v*
(the target value) is optimised, the key statistics C = E[k kᵀ] and AlphaEdit's null-space projection. Each
method's settings extend :class:`KeyValueSettings` with its own (layer or layers, fit, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ...errors import ConfigError
from ..nullspace import check_null_space
from ..settings import Choice, as_choice


class KeyText(Choice):
    """What k* is averaged over (always at the subject's last token, after each context prefix).

    subject: the prefix followed by the subject alone, k(x_j + s) as in the paper (eq. 3).
    prompts: the prefix followed by each edit prompt cut after the subject (the keys the edit prompts produce).
    """

    subject = "subject"
    prompts = "prompts"


class KeyFit(Choice):
    """Which keys an update gives the whole shift δ (kn_edit/editing/rome/update.py, MEMIT's solve).

    mean: k* only, the paper's update (eq. 2); another key k gets the share wᵀk of δ.
    prompts: k* and the key of each edit prompt as it is (no prefix).
    rows: k* and the key of every rewrite row v* was optimised on (each edit prompt after each prefix).
    """

    mean = "mean"
    prompts = "prompts"
    rows = "rows"


@dataclass
class KeyValueSettings:
    """Keys, v*, key statistics and null space: the part of ROME's settings MEMIT and kn-subject share."""

    # k*: the value projection's input at the subject's last token, averaged over context prefixes
    key_text: KeyText = KeyText.subject  # subject (paper: prefix + subject) | prompts (prefix + edit prompt)
    n_prefixes: int = 5  # context prefixes sampled from the model (plus the empty prefix)
    prefix_length: int = 10  # tokens per prefix
    prefix_top_k: int = 5  # prefixes are sampled from the model's top-k next tokens ...
    prefix_seed: int = 0  # ... with this seed (so an edit is reproducible)
    # v*: the FFN output at the subject's last token that makes new the answer (Adam on δ = v* − W k*)
    lr: float = 0.5
    steps: int = 25  # at most this many Adam steps ...
    stop_loss: float = 0.05  # ... stopping early once the mean per-token NLL of new is below this
    kl_factor: float = 0.0625  # weight of KL(P_edited || P_original) after "{subject} is a"
    weight_decay: float = 0.5  # weight of ‖δ‖² / ‖W k*‖²
    clamp_norm_factor: float = 4.0  # ‖δ‖ is kept ≤ this × ‖W k*‖ (the paper's norm constraint)
    # also give δ to the key of the subject at the start of a text (kn_edit.editing.keyvalue.keys.start_text): the
    # key every prompt that begins with the subject has, which no prefixed key covers; left out where it is the
    # first position's (the attention sink: a one-token subject on a model without BOS) or where it would make the
    # update more than START_COST times as large. smollm2, 4 facts whose edit prompts all have the subject inside:
    # subject-first paraphrases top-1 25 → 50 % (rome, kn-subject), neighbours and text as without it (issue 30)
    fit_subject_start: bool = True
    # C = E[k kᵀ]: second moment of layer's keys over generic text (computed once, cached on disk)
    cov_corpus: str = "wikipedia"  # wikipedia (the key slice, kn_edit/data/text.py) or a UTF-8 text file
    cov_tokens: int = 50000  # tokens of text the statistics are taken over
    cov_max_length: int = 128  # each passage cut at this many tokens
    cov_batch_size: int = 16
    cov_ridge: float = 0.0  # C + ridge · mean(diag C) · I before solving (0: C as estimated)
    # C + β·C_subjects: the second moment of other subjects' keys (each name's last token after each context prefix,
    # as k* is taken) weighed in, so the update keeps off what subjects share (kn_edit.editing.keyvalue.statistics.
    # subject_statistics; computed once per layer and cached). 0: C alone, every method's default: on gemma3-270m's
    # 40 Known 1000 facts kn-subject with β = 1 kept no more same-object neighbours (76.7 %) and moved text more
    # (+1.21 % against +1.00 %; evaluations/README.md)
    cov_subjects: float = 0.0
    cov_subject_names: str = "wikipedia"  # wikipedia (the key slice's article titles) or a file, one name per line
    cov_subject_count: int = 1000  # names taken (in the slice's fixed order)
    cache: bool = True  # read / write the statistics under cache_dir
    cache_dir: Optional[str] = None  # null: $KN_EDIT_CACHE/rome
    # AlphaEdit: the update projected onto the null space of the preserved keys (kn_edit.editing.nullspace)
    null_space: bool = False
    null_space_threshold: float = 0.01  # eigenvalues of C below this × the largest span the null space
    null_space_ridge: float = 0.1  # α in (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹, in units of mean(diag C)

    def check(self) -> "KeyValueSettings":
        self.key_text = as_choice(KeyText, self.key_text, "key_text")
        for key in ("n_prefixes", "steps", "cov_max_length", "cov_batch_size"):
            minimum = 0 if key == "n_prefixes" else 1
            if getattr(self, key) < minimum:
                raise ConfigError(f"{key} must be >= {minimum}, got {getattr(self, key)}")
        if self.n_prefixes and self.prefix_length < 1:
            raise ConfigError(f"prefix_length must be >= 1, got {self.prefix_length}")
        if self.prefix_top_k < 1:
            raise ConfigError(f"prefix_top_k must be >= 1, got {self.prefix_top_k}")
        if self.cov_tokens < 1:
            raise ConfigError(f"cov_tokens must be >= 1, got {self.cov_tokens}")
        for key in ("lr", "clamp_norm_factor"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if not isinstance(self.fit_subject_start, bool):
            raise ConfigError(f"fit_subject_start must be true or false, got {self.fit_subject_start!r}")
        for key in ("stop_loss", "kl_factor", "weight_decay", "cov_ridge", "cov_subjects"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not math.isfinite(self.cov_subjects):
            raise ConfigError(f"cov_subjects must be finite, got {self.cov_subjects}")
        if self.cov_subject_count < 1:
            raise ConfigError(f"cov_subject_count must be >= 1, got {self.cov_subject_count}")
        if not isinstance(self.cov_corpus, str) or not self.cov_corpus.strip():
            raise ConfigError("cov_corpus must be 'wikipedia' or the path of a text file")
        if not isinstance(self.cov_subject_names, str) or not self.cov_subject_names.strip():
            raise ConfigError("cov_subject_names must be 'wikipedia' or the path of a file with one name per line")
        check_null_space(self)
        return self


__all__ = ["KeyFit", "KeyText", "KeyValueSettings"]
