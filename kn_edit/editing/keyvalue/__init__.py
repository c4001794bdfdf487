"""The key-value machinery that ROME, MEMIT and kn-subject share, so that each of them is a thin editor: a layer's
FFN value projection read as a memory from keys (its inputs at the subject's last token) to values.

- settings: the shared settings (:class:`KeyValueSettings`: keys, v*, key statistics, null space);
- keys: the subject's key k* (averaged over context prefixes) and the keys an update is fitted to;
- statistics: C = E[k kᵀ] over general text, cached on disk by a digest of the weights it depends on, and the
  keys of many other subjects (names), for the optional subject metric;
- nearest: the other subjects an update for a subject's key would move most, for kn-subject to hold still;
- target: v*, the value that makes the new object the answer (Adam with the paper's KL, decay and clamp);
- solve: the one least-change solve, exact (ROME, kn-subject) or soft (MEMIT).
"""

from .keys import check_causal_requests, check_subjects, context_prefixes, fitted_keys, keys_at, subject_texts
from .settings import KeyFit, KeyText, KeyValueSettings
from .solve import least_change
from .statistics import KeyStatistics, key_statistics, statistics_for
from .target import optimise_value, rewrite_rows

__all__ = [
    "KeyFit", "KeyStatistics", "KeyText", "KeyValueSettings", "check_causal_requests", "check_subjects",
    "context_prefixes", "fitted_keys", "key_statistics", "keys_at", "least_change", "optimise_value", "rewrite_rows",
    "statistics_for", "subject_texts",
]  # fmt: skip
