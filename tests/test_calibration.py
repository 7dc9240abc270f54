"""timm_sila.exits.calibration: temperatures fitted on calibration logits (within TEMPERATURE_BOUNDS, with a warning
at a bound) and thresholds chosen to meet an accuracy drop or a compute budget, shared or one per exit."""
import pytest
import torch
import torch.nn.functional as F

from timm_sila.exits.calibration import (
    TEMPERATURE_BOUNDS, calibrate_temperatures, choose_threshold, choose_thresholds, simulate_exits)
from timm_sila.exits.policy import NEVER, exit_score, exits


def test_temperature_calibration_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true = 2 * torch.randn(4000, 5, generator=g)
    labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(1)
    branch_logits = torch.stack([true * 3.0, true * 0.5], 1)  # over- and under-confident sets
    t = calibrate_temperatures(branch_logits, labels)
    assert t[0] == pytest.approx(3.0, rel=0.1) and t[1] == pytest.approx(0.5, rel=0.1)


def test_threshold_choice_meets_its_constraint():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (500,), generator=g)
    clean = F.one_hot(labels, 10).float() * 4
    noise = lambda s: s * torch.randn(500, 10, generator=g)  # noqa: E731
    branch_logits = torch.stack([clean + noise(0.5), clean + noise(1.5), clean + noise(3.0)], 1)
    seg = [30, 30, 40]
    temps = [1.0, 1.0, 1.0]
    by_drop = choose_threshold(branch_logits, labels, temps, seg, max_drop=1.0)
    assert by_drop['accuracy'] >= by_drop['base_accuracy'] - 1.0
    assert by_drop['compute'] < 1.0
    row = simulate_exits(branch_logits, labels, [by_drop['threshold']] * 2, temps, seg)
    assert row['accuracy'] == pytest.approx(by_drop['accuracy']) and row['compute'] == pytest.approx(by_drop['compute'])
    by_budget = choose_threshold(branch_logits, labels, temps, seg, budget=0.6)
    assert by_budget['compute'] <= 0.6
    with pytest.raises(ValueError, match='exactly one'):
        choose_threshold(branch_logits, labels, temps, seg)


@pytest.mark.parametrize('policy', ['confidence', 'entropy'])
def test_per_exit_thresholds_beat_the_shared_one_when_exits_differ(policy):
    """Set 2 (the shallowest exit) is confidently wrong on half the samples, set 1 is reliable: one shared threshold
    must shut set 2 out and so also holds back set 1; per-exit thresholds close exit 2 and open exit 1."""
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (600,), generator=g)
    clean = F.one_hot(labels, 10).float() * 6
    wrong = F.one_hot((labels + torch.randint(1, 10, (600,), generator=g)) % 10, 10).float() * 8
    liar = torch.where(torch.rand(600, 1, generator=g) < 0.5, wrong, clean)
    branch_logits = torch.stack([clean + torch.randn(600, 10, generator=g),
                                 clean * 0.8 + torch.randn(600, 10, generator=g), liar], 1)
    seg, temps = [30, 30, 40], [1.0, 1.0, 1.0]
    shared = choose_threshold(branch_logits, labels, temps, seg, policy=policy, max_drop=1.0)
    per = choose_thresholds(branch_logits, labels, temps, seg, policy=policy, max_drop=1.0)
    assert per['accuracy'] >= per['base_accuracy'] - 1.0
    assert per['compute'] < shared['compute'] - 0.1
    assert per['exits'][2] == 0 and per['exits'][1] > 0
    row = simulate_exits(branch_logits, labels, per['thresholds'], temps, seg, policy)
    assert row['accuracy'] == pytest.approx(per['accuracy']) and row['compute'] == pytest.approx(per['compute'])
    for bad in (float('nan'), 10 ** 400, True):  # 10**400: an integer no float holds
        with pytest.raises(ValueError, match='finite'):
            choose_thresholds(branch_logits, labels, temps, seg, max_drop=bad)


def test_temperature_bounds_clamp_the_fit():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (500,), generator=g)
    noise = torch.randn(500, 1, 5, generator=g)  # logits unrelated to the labels: free fit T -> infinity
    with pytest.warns(UserWarning, match='set 0'):
        assert calibrate_temperatures(noise, labels) == [TEMPERATURE_BOUNDS[1]]
    timid = 0.01 * F.one_hot(labels, 5).float()[:, None]  # always right but 100-fold underconfident: T -> 0
    with pytest.warns(UserWarning, match='set 0'):
        assert calibrate_temperatures(timid, labels) == [TEMPERATURE_BOUNDS[0]]


def _reference_simulate(branch_logits, labels, thresholds, temperatures, segment_macs, policy):
    """simulate_exits written out per decision: each exit's scaled logits, its score, its prediction."""
    m, n = branch_logits.shape[1], labels.shape[0]
    answered = torch.zeros(n, dtype=torch.bool)
    pred = torch.empty(n, dtype=torch.long)
    exit_set = torch.zeros(n, dtype=torch.long)
    macs = 0.0
    for j, k in enumerate(range(m - 1, 0, -1)):
        macs += segment_macs[j] * float((~answered).sum())
        logits = branch_logits[:, k] / temperatures[k]
        leave = exits(exit_score(logits, policy), thresholds[j], policy) & ~answered
        pred[leave] = logits[leave].argmax(-1)
        exit_set[leave] = k
        answered |= leave
    macs += segment_macs[-1] * float((~answered).sum())
    pred[~answered] = branch_logits[~answered, 0].argmax(-1)
    return dict(accuracy=100.0 * float((pred == labels).float().mean()), compute=macs / (sum(segment_macs) * n),
                exits={k: int((exit_set == k).sum()) for k in [*range(m - 1, 0, -1), 0]})


@pytest.mark.parametrize('policy', ['confidence', 'entropy'])
@pytest.mark.parametrize('sets', [2, 4])
def test_simulation_from_the_precomputed_table_equals_the_decisions_written_out(policy, sets):
    g = torch.Generator().manual_seed(sets)
    labels = torch.randint(0, 7, (300,), generator=g)
    branch_logits = torch.randn(300, sets, 7, generator=g) * 3
    temps = [1.0] + [0.5 + 0.7 * k for k in range(1, sets)]
    seg = list(range(5, 5 + sets))
    scores = torch.cat([exit_score(branch_logits[:, k] / temps[k], policy) for k in range(1, sets)])
    for q in torch.linspace(0, 1, 9).tolist():
        t = float(torch.quantile(scores, q))
        for thresholds in ([t] * (sets - 1), [t] + [NEVER[policy]] * (sets - 2)):
            assert simulate_exits(branch_logits, labels, thresholds, temps, seg, policy) == \
                _reference_simulate(branch_logits, labels, thresholds, temps, seg, policy)
