import math

import pytest
import torch

from chainforget import mitigations
from chainforget.config import MitigationSpec
from chainforget.errors import ConfigError


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(name="l2sp", strength=-1.0), "mitigation.strength: -1.0 is not allowed"),
        (dict(name="ewc", strength=math.nan), "mitigation.strength: nan is not allowed"),
        (dict(name="replay_stage", strength=1.5), "replay ratio 1.5 is not allowed"),
        (dict(name="lwf", strength=1.0, temperature=0.0), "mitigation.temperature: 0.0"),
        (dict(name="sam", strength=0.1, stages=[0]), "mitigation.stages: [0]"),
    ],
)
def test_bad_strengths_are_rejected(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MitigationSpec(**spec)


def test_where_each_mitigation_applies():
    assert [MitigationSpec("l2sp", 1.0).applies_to(k) for k in (1, 2, 3)] == [False, True, True]
    assert [MitigationSpec("sam", 0.05).applies_to(k) for k in (1, 2)] == [True, True]
    assert MitigationSpec("ewc", 1.0, stages=[3]).applies_to(2) is False
    assert MitigationSpec("replay_stage", 0.1).applies_to(2) is False  # replay is data, not a loss


def double(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_penalty_gradients_match_finite_differences():
    weight = double(3, 2, seed=1).requires_grad_()
    bias = double(2, seed=2).requires_grad_()
    anchor = {"w": double(3, 2, seed=3), "b": double(2, seed=4)}
    fisher = {"w": double(3, 2, seed=5).abs(), "b": double(2, seed=6).abs()}
    assert torch.autograd.gradcheck(
        lambda w, b: mitigations.l2sp_penalty({"w": w, "b": b}, anchor, 0.7), (weight, bias)
    )
    assert torch.autograd.gradcheck(
        lambda w, b: mitigations.ewc_penalty({"w": w, "b": b}, anchor, fisher, 1.3), (weight, bias)
    )

    inputs, teacher = double(4, 3, seed=7), double(4, 2, seed=8)  # a small linear "model" producing 2 answer logits
    assert torch.autograd.gradcheck(
        lambda w, b: mitigations.lwf_penalty(inputs @ w + b, teacher, temperature=2.0, strength=0.9).double(),
        (weight, bias),
    )


def test_penalties_by_hand_and_zero_at_the_anchor():
    parameters = {"w": torch.tensor([1.0, 2.0])}
    anchor = {"w": torch.tensor([0.0, 4.0])}
    assert float(mitigations.l2sp_penalty(parameters, anchor, 2.0)) == pytest.approx(0.5 * 2.0 * (1 + 4))
    assert float(mitigations.ewc_penalty(parameters, anchor, {"w": torch.tensor([3.0, 0.5])}, 2.0)) == pytest.approx(
        3 + 2
    )
    assert float(mitigations.l2sp_penalty(parameters, mitigations.snapshot(parameters), 5.0)) == 0.0
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert float(mitigations.lwf_penalty(logits, logits, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_snapshot_is_a_copy_not_a_view():
    weight = torch.nn.Parameter(torch.ones(3))
    anchor = mitigations.snapshot({"w": weight})
    with torch.no_grad():
        weight.add_(1.0)
    assert anchor["w"].tolist() == [1.0, 1.0, 1.0]


def test_diagonal_fisher_is_the_mean_squared_batch_gradient():
    weight = torch.tensor([1.0, -1.0], requires_grad=True)
    batches = [(torch.tensor([1.0, 2.0]), 0.0), (torch.tensor([0.0, 1.0]), 1.0)]
    losses = [lambda x=x, y=y: (weight @ x - y) ** 2 for x, y in batches]
    fisher = mitigations.diagonal_fisher({"w": weight}, losses)
    # gradients 2 (w.x - y) x: batch 1: 2 * (-1) * [1, 2] = [-2, -4]; batch 2: 2 * (-2) * [0, 1] = [0, -4]
    assert fisher["w"].tolist() == pytest.approx([(4 + 0) / 2, (16 + 16) / 2])


def test_sam_steps_rho_along_the_normalised_gradient_and_back():
    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    weight.grad = torch.tensor([3.0, 4.0])
    steps = mitigations.sam_ascent([weight], radius=0.5)
    assert weight.detach().tolist() == pytest.approx([1.3, 1.4])
    assert float(steps[0].norm()) == pytest.approx(0.5)
    mitigations.sam_descent([weight], steps)
    assert weight.detach().tolist() == pytest.approx([1.0, 1.0])
