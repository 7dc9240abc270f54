"""SilaLogits: unmodified criteria compute the Sila loss; anything else fails loudly."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_sila import SilaLoss, SilaLossError
from timm_sila.loss.logits import wrap_sila_logits


def _pair(beta=0.1, decay=0.5, n=10, sets=3):
    raw = torch.randn(4, sets * n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = raw.clone().requires_grad_()
    b = raw.clone().requires_grad_()
    return wrap_sila_logits(a, n, beta, decay), a, b


@pytest.mark.parametrize('criterion,smoothing,soft', [
    (nn.CrossEntropyLoss(), 0.0, False),
    (nn.CrossEntropyLoss(label_smoothing=0.1), 0.1, False),
    (LabelSmoothingCrossEntropy(smoothing=0.2), 0.2, False),
    (SoftTargetCrossEntropy(), 0.0, True),
])
def test_plain_criteria_compute_the_sila_loss(criterion, smoothing, soft):
    logits, a, b = _pair(beta=0.2, decay=0.8)
    target = torch.tensor([0, 9, 3, 3])
    if soft:
        target = 0.7 * F.one_hot(target, 10).double() + 0.3 * F.one_hot(target.flip(0), 10).double()
    got = criterion(logits, target)
    want = SilaLoss(10, 0.2, 0.8, smoothing)(b, target)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('op', [
    torch.sigmoid, lambda x: F.binary_cross_entropy_with_logits(x, torch.zeros_like(x)),
    lambda x: x[:, :10], lambda x: torch.split(x, 2), lambda x: F.softmax(x, -1), lambda x: x * 2,
])
def test_unsupported_operations_raise(op):
    logits, _, _ = _pair()
    with pytest.raises(SilaLossError, match='Sila loss'):
        op(logits)


def test_backward_without_sila_loss_raises():
    logits, _, _ = _pair()
    plain = logits.as_subclass(torch.Tensor)  # what a wrapper that drops the subclass hands on
    loss = F.cross_entropy(plain, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(SilaLossError, match='no Sila loss was computed'):
        loss.backward()


def test_model_output_metadata_matches_model():
    model = timm.create_model('sila_resnet18', num_classes=10, sila_beta=0.3, sila_decay=0.7)
    out = model(torch.randn(2, 3, 32, 32))
    assert (out.shape, out.dtype, out.requires_grad) == ((2, 30), torch.float32, True)
    target = torch.tensor([1, 2])
    torch.testing.assert_close(nn.CrossEntropyLoss()(out, target), SilaLoss(10, 0.3, 0.7)(out.unwrap(), target))


@pytest.mark.parametrize('ignore_index,target', [(-100, [0, -100, 2, 3]), (3, [0, 3, 2, 3])])
def test_cross_entropy_ignore_index_excludes_samples_as_torch(ignore_index, target):
    """nn.CrossEntropyLoss(ignore_index=k) on training logits: samples whose target is k are not trained."""
    logits, a, b = _pair(beta=0.2, decay=0.8)
    target = torch.tensor(target)
    kept = target != ignore_index
    got = nn.CrossEntropyLoss(ignore_index=ignore_index)(logits, target)
    want = SilaLoss(10, 0.2, 0.8)(b[kept], target[kept])  # the mean over the kept samples
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert a.grad[~kept].abs().max() == 0, 'an ignored sample must get no gradient'


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_weight_and_reduction_follow_sila_loss(reduction, smoothing):
    """weight= scales each sample's whole Sila term by weight[target] ('mean' divides by their sum)."""
    logits, a, b = _pair(beta=0.2, decay=0.8)
    target = torch.tensor([0, 9, 3, 3])
    weight = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    got = nn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=smoothing)(logits, target)
    want = SilaLoss(10, 0.2, 0.8, smoothing, weight=weight, reduction=reduction)(b, target)
    if reduction == 'mean' and not smoothing:
        per_sample = SilaLoss(10, 0.2, 0.8, reduction='none')(b.detach(), target)
        torch.testing.assert_close(want.detach(), (weight[target] * per_sample).sum() / weight[target].sum())
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_out_of_range_targets_still_rejected():
    logits, _, _ = _pair()
    with pytest.raises(ValueError, match=r'\[0, 10\) or ignore_index=-100'):
        F.cross_entropy(logits, torch.tensor([0, 10, 2, 3]))
