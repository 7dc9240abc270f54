"""When a sample leaves at an early exit: the score each policy compares with a threshold, and the one exit test.

* 'confidence': score = max softmax probability; a sample exits when score >= threshold.
* 'entropy': score = entropy of the softmax (nats); a sample exits when score <= threshold.

Scores are in the threshold's own units, so a quantile of scores is a threshold as it is. `certainty(score)` orders
scores and thresholds from least to most certain under either policy (higher = stricter threshold, fewer exits).
"""
import torch

__all__ = ['POLICIES', 'NEVER', 'check_policy', 'exit_score', 'exits', 'certainty']

POLICIES = ('confidence', 'entropy')
NEVER = {'confidence': 2.0, 'entropy': -1.0}  # thresholds no score clears: max prob <= 1, entropy >= 0


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}.')
    return policy


def exit_score(logits: torch.Tensor, policy: str) -> torch.Tensor:
    """(B,) scores of (B, N) logits (already divided by the set's temperature)."""
    if policy == 'confidence':
        return logits.softmax(-1).amax(-1)
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def exits(score: torch.Tensor, threshold: float, policy: str) -> torch.Tensor:
    """(B,) bool: the samples whose score clears `threshold` and leave at this exit."""
    return score >= threshold if policy == 'confidence' else score <= threshold


def certainty(score, policy: str):
    """Score (tensor or number) mapped so that higher is more certain under `policy`."""
    return score if policy == 'confidence' else -score
