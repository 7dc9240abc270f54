"""DDP as timm's train.py sets it up (ClassificationTask.prepare_distributed): 2 CPU processes, gloo backend."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import timm

from timm_sila import SilaLoss

pytestmark = pytest.mark.slow  # the module set-up runs two DDP processes (slow as pyproject.toml defines it)

N, BETA, DECAY, PER_RANK = 10, 0.2, 0.8, 3
ARCH = 'sila_test_convnext'  # LayerNorm only: per-rank and concatenated batches see the same normalisation
TIMEOUT_S = 240

WORKER = textwrap.dedent('''
    import os, sys, traceback
    import torch, torch.distributed as dist, torch.nn as nn
    import timm, timm_sila
    from timm.task import ClassificationTask
    from timm_sila import SilaLossError

    out_dir, arch, n, beta, decay, per_rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), \\
        float(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    data = torch.load(os.path.join(out_dir, 'data.pt'))
    x = data['x'][rank * per_rank:(rank + 1) * per_rank]
    target = data['target'][rank * per_rank:(rank + 1) * per_rank]
    result = {}

    def build():
        torch.manual_seed(0)
        return timm.create_model(arch, num_classes=n, sila_beta=beta, sila_decay=decay).train()

    # 1. train.py's setup: task.prepare_distributed(device_ids=..., broadcast_buffers=True); None is the CPU form
    model = build()
    task = ClassificationTask(model, nn.CrossEntropyLoss(), device=torch.device('cpu'), verbose=False)
    task.prepare_distributed(device_ids=None, broadcast_buffers=True)
    res = task(x, target)
    res['loss'].backward()
    result['output_type'] = type(res['output']).__name__
    result['loss'] = res['loss'].detach()
    result['grads'] = {k: p.grad.clone() for k, p in model.named_parameters()}

    # 2. a DDP setting that drops the tensor subclass must stop at the first backward, not train plain CE
    for name, kwargs in (('find_unused', dict(find_unused_parameters=True)), ('static_graph', dict(static_graph=True))):
        ddp = torch.nn.parallel.DistributedDataParallel(build(), **kwargs)
        try:
            out = ddp(x)
            result[name + '_output_type'] = type(out).__name__
            nn.CrossEntropyLoss()(out, target).backward()
            result[name] = 'no error'
        except SilaLossError as e:
            result[name] = 'SilaLossError: ' + str(e)
        except Exception as e:
            result[name] = type(e).__name__ + ': ' + str(e)
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2 * PER_RANK, 3, 32, 32, generator=g)
    target = torch.randint(0, N, (2 * PER_RANK,), generator=g)
    torch.save({'x': x, 'target': target}, out / 'data.pt')
    script = out / 'worker.py'
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2',
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(out), ARCH, str(N), str(BETA), str(DECAY), str(PER_RANK)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f'DDP workers did not finish within {TIMEOUT_S} s')
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return x, target, [torch.load(out / f'rank{r}.pt') for r in range(2)]


def test_ddp_grads_equal_single_process_grads_on_concatenated_batch(ddp_run):
    x, target, results = ddp_run
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=N, sila_beta=BETA, sila_decay=DECAY).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    SilaLoss(N, BETA, DECAY)(model(x).unwrap(), target).backward()
    for r, res in enumerate(results):
        assert res['output_type'] == 'SilaLogits'
        with torch.no_grad():  # each rank's loss is the Sila loss of its own half
            want = SilaLoss(N, BETA, DECAY)(model(x[r * PER_RANK:(r + 1) * PER_RANK]).unwrap(),
                                            target[r * PER_RANK:(r + 1) * PER_RANK])
        torch.testing.assert_close(res['loss'], want)
        assert any(k.startswith('heads.') for k in res['grads'])
        for k, p in model.named_parameters():
            torch.testing.assert_close(res['grads'][k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize('setting', ['find_unused', 'static_graph'])
def test_ddp_setting_that_drops_the_subclass_raises(ddp_run, setting):
    _, _, results = ddp_run
    for res in results:
        assert res[setting].startswith('SilaLossError: '), res[setting]
        assert 'DistributedDataParallel' in res[setting] and 'find_unused_parameters=True' in res[setting]
