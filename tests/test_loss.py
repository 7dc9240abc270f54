"""SilaLoss against a literal transcription of the paper's Fig. 1 reference code."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_sila import SilaLoss, sila_log_probs, sila_set_weights


class PaperLoss(nn.Module):
    """Fig. 1 of the paper, transcribed literally (M cross-entropy passes)."""

    def __init__(self, num_class, beta, Lambda):
        super().__init__()
        self.beta = beta
        self.Lambda = Lambda
        self.num_class = num_class

    def forward(self, logits, target):
        loss = F.cross_entropy(logits, target)
        for i in range(1, int(logits.shape[1] / self.num_class)):
            weight = self.Lambda ** (i - 1) * self.beta
            loss += weight * F.cross_entropy(logits, target + i * self.num_class)
        return loss


def _logits(batch, sets, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(batch, sets * n, generator=g, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize('sets', [2, 3, 4])
@pytest.mark.parametrize('beta,decay', [(0.1, 0.5), (0.05, 0.8), (0.3, 0.5), (1.0, 1.0), (0.0, 0.5)])
def test_matches_paper_reference_values_and_grads(sets, beta, decay):
    n = 7
    logits = _logits(6, sets, n, seed=sets)
    target = torch.randint(0, n, (6,), generator=torch.Generator().manual_seed(1))
    ref_logits = logits.detach().clone().requires_grad_()
    ours = SilaLoss(n, beta, decay)(logits, target)
    ref = PaperLoss(n, beta, decay)(ref_logits, target)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-12)


def test_single_log_softmax_pass(monkeypatch):
    calls = []
    real = F.log_softmax

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, 'log_softmax', counting)
    SilaLoss(5)(_logits(4, 3, 5), torch.tensor([0, 1, 2, 3]))
    assert len(calls) == 1


def test_soft_one_hot_equals_hard():
    n, sets = 6, 3
    logits = _logits(5, sets, n)
    target = torch.tensor([0, 5, 2, 2, 1])
    hard = SilaLoss(n)(logits, target)
    soft = SilaLoss(n)(logits, F.one_hot(target, n).double())
    torch.testing.assert_close(hard, soft, rtol=1e-12, atol=1e-12)


def test_mixed_targets_are_linear():
    n, lam = 4, 0.3
    logits = _logits(8, 3, n)
    a = torch.randint(0, n, (8,), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, n, (8,), generator=torch.Generator().manual_seed(3))
    loss = SilaLoss(n)
    mixed = loss(logits, lam * F.one_hot(a, n).double() + (1 - lam) * F.one_hot(b, n).double())
    torch.testing.assert_close(mixed, lam * loss(logits, a) + (1 - lam) * loss(logits, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('smoothing', [0.1, 0.25])
def test_smoothing_applies_to_base_distribution_before_weighting(smoothing):
    n, sets, beta, decay = 5, 3, 0.2, 0.5
    logits = _logits(4, sets, n)
    target = torch.tensor([0, 1, 4, 3])
    q = (1 - smoothing) * F.one_hot(target, n).double() + smoothing / n
    log_p = F.log_softmax(logits, -1)
    w = sila_set_weights(sets, beta, decay)
    expected = -sum(w[j] * (q * log_p[:, j * n:(j + 1) * n]).sum(-1) for j in range(sets)).mean()
    torch.testing.assert_close(SilaLoss(n, beta, decay, smoothing)(logits, target), expected)
    torch.testing.assert_close(SilaLoss(n, beta, decay, smoothing)(logits, F.one_hot(target, n).double()), expected)


def test_set_weights():
    assert sila_set_weights(4, 0.1, 0.5) == [1.0, 0.1, 0.05, 0.025]


def test_folded_log_probs_shape():
    assert sila_log_probs(_logits(3, 3, 10), 10).shape == (3, 10)


@pytest.mark.parametrize('logits,target,match', [
    (torch.zeros(2, 25), torch.tensor([0, 1]), 'not a multiple'),
    (torch.zeros(2, 10), torch.tensor([0, 1]), 'M >= 2'),
    (torch.zeros(2, 30), torch.tensor([0, 10]), r'\[0, 10\)'),
    (torch.zeros(2, 30), torch.tensor([-1, 0]), r'\[0, 10\)'),
    (torch.zeros(2, 30), torch.zeros(2, 30), r'\(batch, num_classes\)'),
    (torch.zeros(2, 30), torch.tensor([0, 1, 2]), 'shape'),
])
def test_clear_errors(logits, target, match):
    with pytest.raises(ValueError, match=match):
        SilaLoss(10)(logits, target)


@pytest.mark.parametrize('kwargs', [dict(beta=-0.1), dict(decay=-1.0), dict(smoothing=1.0)])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        SilaLoss(10, **kwargs)
