"""One train step the way timm's train.py takes it (timm.task, timm.loss, timm.data.Mixup, ModelEmaV3)."""
import copy

import pytest
import torch
import torch.nn as nn

import timm
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import ClassificationTask, DistillationTeacher, LogitDistillationTask
from timm.utils import ModelEmaV3, unwrap_model

from timm_sila import SilaLoss, SilaLossError

N, BETA, DECAY = 10, 0.2, 0.8  # non-default β/λ so that the model's own values must be the ones used
ARCH = 'sila_test_resnet'  # timm's tiny ResNet (BatchNorm, 3 sets): fast on a shared CPU


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(ARCH, num_classes=N, sila_beta=BETA, sila_decay=DECAY).train()


def _batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, N, (b,), generator=g)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct(model, x, target, smoothing=0.0, autocast=None):
    """Reference: SilaLoss on the unwrapped logits; returns (loss, grads)."""
    model.zero_grad(set_to_none=True)
    with autocast or torch.autocast('cpu', enabled=False):
        loss = SilaLoss(N, BETA, DECAY, smoothing)(model(x).unwrap(), target)
    loss.backward()
    return loss.detach(), _grads(model)


def _task_step(task, x, target, autocast=None):
    task.trainable_module.zero_grad(set_to_none=True)
    with autocast or torch.autocast('cpu', enabled=False):
        loss = task(x, target)['loss']
    loss.backward()
    return loss.detach(), _grads(unwrap_model(task.trainable_module))


def _assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    assert any(k.startswith('heads.') for k in got) and any(k.startswith('base.') for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k, **tol)


@pytest.mark.parametrize('criterion,smoothing', [
    (nn.CrossEntropyLoss(), 0.0),  # train.py --smoothing 0
    (LabelSmoothingCrossEntropy(smoothing=0.1), 0.1),  # train.py default (--smoothing 0.1)
    (nn.CrossEntropyLoss(label_smoothing=0.3), 0.3),
])
def test_classification_task_computes_the_sila_loss(criterion, smoothing):
    model = _model()
    task = ClassificationTask(model, criterion, device=torch.device('cpu'), verbose=False)
    x, target = _batch()
    got, got_grads = _task_step(task, x, target)
    want, want_grads = _direct(model, x, target, smoothing)
    torch.testing.assert_close(got, want)
    _assert_grads_close(got_grads, want_grads)
    # and it is not the plain cross-entropy over M·N logits
    with torch.no_grad():
        plain = nn.CrossEntropyLoss()(model(x).unwrap(), target)
    assert abs(got.item() - plain.item()) > 0.1


def test_mixup_soft_targets_compute_the_sila_loss():
    """train.py --mixup/--cutmix: timm.data.Mixup (with label smoothing) then SoftTargetCrossEntropy."""
    model = _model()
    task = ClassificationTask(model, SoftTargetCrossEntropy(), device=torch.device('cpu'), verbose=False)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=N)
    x, target = _batch()
    torch.manual_seed(3)
    x, soft = mixup(x, target)
    assert soft.shape == (4, N) and soft.max() < 1
    got, got_grads = _task_step(task, x, soft)
    want, want_grads = _direct(model, x, soft)
    torch.testing.assert_close(got, want)
    _assert_grads_close(got_grads, want_grads)


@pytest.mark.parametrize('criterion,flag', [
    (BinaryCrossEntropy(smoothing=0.1), '--bce-loss'),
    (BinaryCrossEntropy(target_threshold=0.2, sum_classes=True), '--bce-loss'),
    (JsdCrossEntropy(num_splits=2, smoothing=0.1), '--jsd-loss'),
])
def test_unsupported_train_py_criteria_stop_with_the_flag_name(criterion, flag):
    task = ClassificationTask(_model(), criterion, device=torch.device('cpu'), verbose=False)
    x, target = _batch()
    with pytest.raises(SilaLossError, match=flag):
        task(x, target)


def test_logit_distillation_stops_with_the_flag_name():
    """train.py --kd-model-name builds a LogitDistillationTask; its KD term must not run over M·N logits."""
    student = _model()
    teacher = DistillationTeacher(timm.create_model(ARCH[len('sila_'):], num_classes=N), num_classes=N)
    task = LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), temperature=2.0,
                                 device=torch.device('cpu'), verbose=False)
    x, target = _batch()
    with pytest.raises(SilaLossError, match='--kd-model-name'):
        task(x, target)


def test_bf16_autocast_step():
    """train.py --amp --amp-dtype bfloat16 --device cpu: torch.autocast around the task."""
    model = _model()
    task = ClassificationTask(model, LabelSmoothingCrossEntropy(0.1), device=torch.device('cpu'), verbose=False)
    x, target = _batch()
    amp = lambda: torch.autocast('cpu', dtype=torch.bfloat16)  # noqa: E731
    got, got_grads = _task_step(task, x, target, autocast=amp())
    want, want_grads = _direct(model, x, target, 0.1, autocast=amp())
    torch.testing.assert_close(got, want)
    _assert_grads_close(got_grads, want_grads)
    fp32, fp32_grads = _direct(model, x, target, 0.1)  # bf16 is an approximation of the fp32 step
    torch.testing.assert_close(got.float(), fp32, rtol=0.02, atol=0.02)
    g, w = torch.cat([v.flatten() for v in got_grads.values()]), torch.cat([v.flatten() for v in fp32_grads.values()])
    assert torch.nn.functional.cosine_similarity(g.float(), w, dim=0) > 0.9


def test_model_ema_v3_tracks_base_and_heads():
    """train.py --model-ema: task.setup_ema (ModelEmaV3), task.update_ema after each optimizer step."""
    model = _model()
    task = ClassificationTask(model, nn.CrossEntropyLoss(), device=torch.device('cpu'), verbose=False)
    task.setup_ema(decay=0.75, use_warmup=False)
    ema = task.trainable_module_ema
    assert isinstance(ema, ModelEmaV3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, target = _batch()
    for step in (1, 2):  # train.py: optimizer.step(); task.update_ema(step=num_updates), num_updates from 1
        before = copy.deepcopy(ema.module.state_dict())
        opt.zero_grad()
        task(x, target)['loss'].backward()
        opt.step()
        task.update_ema(step=step)
    decay = ema.get_decay(2)  # step 1 copies the model (decay 0), step 2 averages with decay 0.75
    assert decay == 0.75
    after = model.state_dict()
    ema_sd = ema.module.state_dict()
    assert ema_sd.keys() == after.keys()
    moved = 0
    for k, v in after.items():
        if not v.is_floating_point():
            continue
        torch.testing.assert_close(ema_sd[k], decay * before[k] + (1 - decay) * v, msg=k)
        moved += k.startswith('heads.') and not torch.equal(before[k], v)
    assert moved, 'auxiliary heads were not trained / averaged'
    # train.py validates the EMA copy in eval mode: (B, N) logits of the branch
    ema_eval = task.get_eval_model(ema=True).eval()
    with torch.no_grad():
        out = ema_eval(x)
        ref = timm.create_model(ARCH[len('sila_'):], num_classes=N).eval()
        ref.load_state_dict(ema.module.base.state_dict())
        torch.testing.assert_close(out, ref(x))
    assert type(out) is torch.Tensor and out.shape == (4, N)


def test_gradient_accumulation():
    """train.py --grad-accum-steps 2: loss / 2 per micro-batch, backward twice (under task.no_sync())."""
    model = _model()
    task = ClassificationTask(model, LabelSmoothingCrossEntropy(0.1), device=torch.device('cpu'), verbose=False)
    x, target = _batch(8)
    model.zero_grad(set_to_none=True)
    with task.no_sync():
        (task(x[:4], target[:4])['loss'] / 2).backward()
    (task(x[4:], target[4:])['loss'] / 2).backward()
    got = _grads(model)
    _, g1 = _direct(model, x[:4], target[:4], 0.1)
    _, g2 = _direct(model, x[4:], target[4:], 0.1)
    _assert_grads_close(got, {k: (g1[k] + g2[k]) / 2 for k in g1})


def test_channels_last_step():
    model = _model().to(memory_format=torch.channels_last)
    task = ClassificationTask(model, nn.CrossEntropyLoss(), device=torch.device('cpu'), verbose=False)
    x, target = _batch()
    got, got_grads = _task_step(task, x.contiguous(memory_format=torch.channels_last), target)
    want, want_grads = _direct(model, x, target)
    torch.testing.assert_close(got, want)
    _assert_grads_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)


def test_task_compile_keeps_the_sila_loss():
    """train.py --torchcompile: task.compile wraps the model in torch.compile (dynamo; eager backend here)."""
    torch._dynamo.reset()
    model = _model()
    task = ClassificationTask(model, nn.CrossEntropyLoss(), device=torch.device('cpu'), verbose=False)
    task.compile(backend='eager')
    assert task.trainable_module is not model
    x, target = _batch()
    got, got_grads = _task_step(task, x, target)
    want, want_grads = _direct(model, x, target)
    torch.testing.assert_close(got, want)
    _assert_grads_close(got_grads, want_grads)
    torch._dynamo.reset()
