"""SilaLoss against a literal transcription of the paper's Fig. 1 reference code; torch's cross-entropy options
(weight, ignore_index, reduction, label smoothing) and empty batches give what torch gives."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_sila import SilaLoss, sila_cross_entropy, sila_log_probs, sila_set_weights
from timm_sila.loss.logits import wrap_sila_logits


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
    (torch.zeros(2, 30), torch.tensor([0, 10]), r'\[0, 10\) or ignore_index=-100'),
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


# --- torch's cross-entropy options (weight, ignore_index, reduction) -------------------------------------------------
def _hand_reference(logits, target, n, beta, decay, weight=None, ignore_index=-100, smoothing=0.0, reduction='mean'):
    """Sample by sample in float64: w[t]·(1-ε)·Sila term + ε/N·Σ_c w_c·(Sila term of class c); ignored samples
    contribute 0; 'mean' divides by Σ w[t] over the kept samples."""
    sets = logits.shape[1] // n
    set_w = [1.0] + [beta * decay ** (j - 1) for j in range(1, sets)]
    class_w = [1.0] * n if weight is None else [float(v) for v in weight]
    rows, denom = [], 0.0
    for b in range(logits.shape[0]):
        t = int(target[b])
        if t == ignore_index:
            rows.append(0.0)
            continue
        lp = torch.log_softmax(logits[b].detach().double(), -1).tolist()
        term = lambda c: -sum(set_w[j] * lp[c + j * n] for j in range(sets))  # noqa: E731
        smooth = sum(class_w[c] * term(c) for c in range(n))
        rows.append((1 - smoothing) * class_w[t] * term(t) + smoothing / n * smooth)
        denom += class_w[t]
    if reduction == 'none':
        return torch.tensor(rows, dtype=torch.float64)
    total = sum(rows)
    return torch.tensor(total if reduction == 'sum' else (total / denom if denom else math.nan), dtype=torch.float64)


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('smoothing', [0.0, 0.2])
@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('ignore_index', [-100, 2])
def test_torch_options_match_a_hand_computed_reference(reduction, smoothing, weighted, ignore_index):
    n, sets, beta, decay = 5, 3, 0.3, 0.6
    logits = _logits(7, sets, n, seed=4)
    target = torch.tensor([0, 2, 4, -100, 2, 1, 3]) if ignore_index == -100 else torch.tensor([0, 2, 4, 1, 2, 1, 3])
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64) if weighted else None
    got = SilaLoss(n, beta, decay, smoothing, ignore_index=ignore_index, weight=weight, reduction=reduction)(
        logits, target)
    want = _hand_reference(logits, target, n, beta, decay, weight, ignore_index, smoothing, reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize('ignore_index', [-100, 3])
def test_ignored_samples_are_excluded_as_torch_does(ignore_index):
    n = 6
    logits = _logits(8, 3, n, seed=5)
    target = torch.tensor([0, 3, 5, 3, 1, 2, 3, 4])
    if ignore_index == -100:
        target = target.masked_fill(target == 3, -100)
    kept = target != ignore_index
    got = sila_cross_entropy(logits, target, n, 0.2, 0.5, ignore_index=ignore_index)
    want = PaperLoss(n, 0.2, 0.5)(logits[kept], target[kept])  # the mean over the kept samples only
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('soft', [False, True])
def test_formula_is_torchs_cross_entropy_on_log_probs(reduction, smoothing, weighted, soft):
    """Fed log_softmax(x), the shared formula reproduces F.cross_entropy(x, ...) for every option combination."""
    from timm_sila.loss.functional import _cross_entropy_of_log_probs
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    target = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1) if soft else \
        torch.tensor([0, 1, 1, -100, 3, 2])
    weight = torch.tensor([1.0, 0.2, 3.0, 0.7], dtype=torch.float64) if weighted else None
    got = _cross_entropy_of_log_probs(F.log_softmax(x, -1), target, weight, -100, reduction, smoothing)
    want = F.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('empty', [False, True])
def test_nothing_kept_behaves_like_torch(reduction, smoothing, empty):
    """Empty batch or every sample ignored: 'mean' is nan, 'sum' 0, 'none' zeros/empty — torch's answers."""
    n = 4
    batch = 0 if empty else 3
    x = _logits(batch, 2, n)
    target = torch.full((batch,), -100)
    got = sila_cross_entropy(x, target, n, reduction=reduction, smoothing=smoothing)
    want = F.cross_entropy(torch.zeros(batch, n, dtype=torch.float64), target, reduction=reduction,
                           label_smoothing=smoothing)
    torch.testing.assert_close(got, want, equal_nan=True)
    soft = SilaLoss(n, reduction=reduction)(_logits(0, 2, n), torch.zeros(0, n, dtype=torch.float64))
    torch.testing.assert_close(soft, F.cross_entropy(torch.zeros(0, n), torch.zeros(0, n), reduction=reduction)
                               .double(), equal_nan=True)


@pytest.mark.parametrize('kwargs,target,match', [
    (dict(ignore_index=2), torch.rand(2, 10, dtype=torch.float64), 'soft'),
    (dict(weight=torch.ones(30, dtype=torch.float64)), torch.tensor([0, 1]), 'num_classes=10 class weights'),
    (dict(weight=torch.ones(10, dtype=torch.long)), torch.tensor([0, 1]), 'floating'),
    (dict(ignore_index=1.5), torch.tensor([0, 1]), 'ignore_index'),
    (dict(reduction='batchmean'), torch.tensor([0, 1]), 'reduction'),
    (dict(ignore_index=-1), torch.tensor([0, -100]), r'ignore_index=-1; got \[-100\]'),
])
def test_bad_options_are_one_clear_error(kwargs, target, match):
    with pytest.raises(ValueError, match=match):
        sila_cross_entropy(_logits(2, 3, 10), target, 10, **kwargs)


# --- empty batches: what torch gives -------------------------------------------------------------------------------
EMPTY = {
    'SilaLoss mean': (lambda: SilaLoss(10)(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long)), 'nan'),
    'SilaLoss sum': (lambda: SilaLoss(10, reduction='sum')(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long)), 0.0),
    'SilaLoss none': (lambda: SilaLoss(10, reduction='none')(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long)),
                      (0,)),
    'SilaLoss soft mean': (lambda: SilaLoss(10)(torch.zeros(0, 30), torch.zeros(0, 10)), 'nan'),
    'nn.CrossEntropyLoss on SilaLogits': (
        lambda: nn.CrossEntropyLoss()(wrap_sila_logits(torch.zeros(0, 30), 10, 0.1, 0.5),
                                      torch.zeros(0, dtype=torch.long)), 'nan'),
    'torch itself (reference)': (lambda: F.cross_entropy(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), 'nan'),
}


@pytest.mark.parametrize('run,expected', EMPTY.values(), ids=EMPTY.keys())
def test_empty_batches_match_torch(run, expected):
    out = run()
    if expected == 'nan':
        assert out.ndim == 0 and math.isnan(out)
    elif isinstance(expected, tuple):
        assert out.shape == expected
    else:
        assert float(out) == expected
