"""Stateless metric math (the torchmetrics pattern: functions here, thin stateful Metrics in metrics.py).

Every log-probability comes from ``log_softmax``/``cross_entropy``, never ``softmax().log()``.
"""

from __future__ import annotations

import torch

from ..models.likelihood import token_nll  # noqa: F401  (the metric math's one token NLL)


def _check(name: str, *tensors: torch.Tensor) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if any(t.dim() != 1 for t in tensors) or len({s[0] for s in shapes}) > 1:
        raise ValueError(f"{name}: expected 1-D tensors of one length, got shapes {shapes}")


def answer_scores(
    logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, n_answers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer (a prompt with its target, teacher-forced over one or more steps): (log P(target) [n_answers],
    top1 [n_answers] bool: every step's argmax is its target).

    logits [n_steps, vocab]; targets [n_steps] token ids; owner [n_steps] answer index of each step.
    """
    if logits.dim() != 2 or targets.shape != (logits.shape[0],) or owner.shape != targets.shape:
        raise ValueError(
            f"answer_scores: logits [n_steps, vocab], targets and owner [n_steps]; got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(owner.shape)}"
        )
    step_logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    logp = torch.zeros(n_answers, device=logits.device).index_add_(0, owner, step_logp)
    misses = torch.zeros(n_answers, device=logits.device).index_add_(0, owner, (logits.argmax(-1) != targets).float())
    return logp, misses == 0


def edit_success(
    new_top1: torch.Tensor, logp_new_after: torch.Tensor, logp_old_after: torch.Tensor, logp_new_before: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Means over one fact's prompts: new object top-1; P(new) > P(old); ΔP(new) = P_after(new) − P_before(new)."""
    _check("edit_success", new_top1, logp_new_after, logp_old_after, logp_new_before)
    return {
        "top1": new_top1.float().mean(),
        "new_beats_old": (logp_new_after > logp_old_after).float().mean(),
        "delta_p_new": (logp_new_after.double().exp() - logp_new_before.double().exp()).mean(),
    }


def retention_counts(
    correct_before: torch.Tensor, correct_after: torch.Tensor, logp_before: torch.Tensor, logp_after: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums over prompts of unedited facts (gold object): counts of correct (top-1) answers before, after and
    both, and the summed −log P(gold) before and after."""
    _check("retention_counts", correct_before, correct_after, logp_before, logp_after)
    return {
        "n": torch.tensor(float(len(correct_before)), device=logp_before.device),
        "correct_before": correct_before.float().sum(),
        "correct_after": correct_after.float().sum(),
        "kept": (correct_before & correct_after).float().sum(),
        "nll_before": -logp_before.double().sum(),  # float64: these sums pool many prompts
        "nll_after": -logp_after.double().sum(),
    }


def perplexity(nll_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """exp(mean negative log-likelihood); NaN for an empty count."""
    return torch.exp(nll_sum / count) if float(count) > 0 else torch.tensor(float("nan"))




def relative_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(after − before) / before."""
    return (after - before) / before


def probability_change_ratio(logp_before: torch.Tensor, logp_after: torch.Tensor) -> torch.Tensor:
    """(P_after − P_before) / P_before per answer, computed in log space: exp(logp_after − logp_before) − 1."""
    _check("probability_change_ratio", logp_before, logp_after)
    return torch.expm1(logp_after - logp_before)
