import math

import pytest
import torch

from chainforget import mitigations
from chainforget.config import MitigationSpec
from chainforget.errors import ConfigError


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            dict(name="l2sp", strength=-1.0),
            "strength: penalty weight -1.0 is not allowed for l2sp; use 0 <= lambda",
        ),
        (
            dict(name="safety_projection", strength=1.5),
            "threshold 1.5 is not allowed for safety_projection; use -1 <= tau <= 1",
        ),
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


def safety_layer(b_safety, a_safety, scale=2.0):
    """A layer whose safety stage moved it from B = 0 (LoRA's start) to ``b_safety @ a_safety``."""
    update = scale * b_safety @ a_safety
    return mitigations.SafetyLayer("a", "b", scale, mitigations.update_basis(update))


def test_update_basis_spans_the_update_with_orthonormal_columns():
    b, a = double(6, 2, seed=1), double(2, 5, seed=2)
    basis = mitigations.update_basis(b @ a)
    assert basis.shape == (6, 2)  # a rank-2 update
    assert torch.allclose(basis.T @ basis, torch.eye(2, dtype=basis.dtype), atol=1e-12)
    assert torch.allclose(basis @ (basis.T @ b), b, atol=1e-12)  # B's columns lie in the span
    assert mitigations.update_basis(torch.zeros(4, 3, dtype=torch.float64)).shape == (4, 0)


def test_projection_keeps_a_layer_already_inside_the_safety_subspace():
    b_s, a_s = double(6, 2, seed=1), double(2, 5, seed=2)
    layer = safety_layer(b_s, a_s)
    b = b_s @ double(2, 2, seed=3)  # the later stage moved B only within the safety subspace
    new_b, similarity = mitigations.project_update(b, double(2, 5, seed=4), layer, b_s, a_s, tau=1.0)
    assert similarity == pytest.approx(1.0)
    assert new_b is None


def test_projection_by_threshold_and_its_geometry():
    b_s, a_s = double(6, 2, seed=1), double(2, 5, seed=2)
    layer = safety_layer(b_s, a_s)
    b, a = double(6, 2, seed=5), double(2, 5, seed=6)
    update = 2.0 * (b @ a - b_s @ a_s)
    q = layer.basis
    expected = float(torch.linalg.matrix_norm(q @ q.T @ update) / torch.linalg.matrix_norm(update))
    assert 0 < expected < 1
    for tau in (-1.0, 0.0, expected - 1e-9):  # nothing projected at or below the similarity
        assert mitigations.project_update(b, a, layer, b_s, a_s, tau) == (None, pytest.approx(expected))
    new_b, similarity = mitigations.project_update(b, a, layer, b_s, a_s, tau=1.0)
    assert similarity == pytest.approx(expected)
    # the projected layer is the safety stage's weights plus the projection of the update since then
    assert torch.allclose(2.0 * new_b @ a, 2.0 * b_s @ a_s + q @ q.T @ update, atol=1e-12)
    again, similarity = mitigations.project_update(new_b, a, layer, b_s, a_s, tau=1.0)
    assert again is None and similarity == pytest.approx(1.0)  # a projection is idempotent


def test_project_layers_edits_b_in_place_and_reports_each_layer():
    b_s, a_s = double(6, 2, seed=1), double(2, 5, seed=2)
    basis = safety_layer(b_s, a_s).basis
    layers = {
        "inside": mitigations.SafetyLayer("in.a", "in.b", 2.0, basis),
        "outside": mitigations.SafetyLayer("out.a", "out.b", 2.0, basis),
    }
    parameters = {"in.a": a_s.clone(), "in.b": 2 * b_s, "out.a": a_s.clone(), "out.b": double(6, 2, seed=7)}
    safety = {"in.a": a_s, "in.b": b_s, "out.a": a_s, "out.b": b_s}
    kept = parameters["in.b"].clone()
    done = mitigations.project_layers(parameters, layers, safety, tau=0.9)
    assert done["projected"] == ["outside"]
    assert done["similarity"]["inside"] == pytest.approx(1.0)
    assert torch.equal(parameters["in.b"], kept)
    q = layers["outside"].basis
    assert torch.allclose(parameters["out.b"], q @ q.T @ double(6, 2, seed=7), atol=1e-12)


def test_safety_anchor_penalty_by_hand_gradient_and_zero_inside_the_subspace():
    b_s, a_s = double(6, 2, seed=1), double(2, 5, seed=2)
    layer = {"l": safety_layer(b_s, a_s)}
    anchor = {"a": a_s, "b": b_s}
    q = layer["l"].basis
    b, a = double(6, 2, seed=3), double(2, 5, seed=4)
    update = 2.0 * (b @ a - b_s @ a_s)
    by_hand = 0.5 * 0.7 * float(((update - q @ q.T @ update) ** 2).sum())
    value = mitigations.safety_anchor_penalty({"a": a, "b": b}, anchor, layer, 0.7)
    assert float(value) == pytest.approx(by_hand)
    inside = {"a": double(2, 5, seed=5), "b": b_s @ double(2, 2, seed=6)}  # moves within the subspace cost nothing
    assert float(mitigations.safety_anchor_penalty(inside, anchor, layer, 0.7)) == pytest.approx(0.0, abs=1e-20)
    assert torch.autograd.gradcheck(
        lambda a, b: mitigations.safety_anchor_penalty({"a": a, "b": b}, anchor, layer, 0.7),
        (a.clone().requires_grad_(), b.clone().requires_grad_()),
    )


def test_group_loss_sums_by_hand():
    losses = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    sums, sizes = mitigations.group_loss_sums(losses, torch.tensor([0, 0, -1, 2]), 3)
    assert sums.tolist() == [4.0, 0.0, 7.0] and sizes.tolist() == [2.0, 0.0, 1.0]


def test_group_dro_moves_weight_toward_the_group_whose_loss_rises():
    weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    present = torch.tensor([True, True, True])
    assert torch.equal(
        mitigations.group_dro_step(weights, torch.tensor([1.0, 2.0, 3.0]).double(), present, 0.0), weights
    )
    history = [weights]
    for step in range(5):  # group 2's loss keeps rising, the others stay
        losses = torch.tensor([1.0, 1.0, 1.0 + step], dtype=torch.float64)
        history.append(mitigations.group_dro_step(history[-1], losses, present, 0.5))
    assert all(float(q.sum()) == pytest.approx(1.0) for q in history)
    assert [float(q[2]) for q in history] == sorted(float(q[2]) for q in history)
    assert float(history[-1][2]) > 0.9
    q = history[1]  # one step by hand: q_g exp(eta l_g), normalised
    raised = torch.tensor([math.exp(0.5), math.exp(0.5), math.exp(0.5)], dtype=torch.float64) / 3
    assert torch.allclose(q, raised / raised.sum())
    absent = mitigations.group_dro_step(weights, torch.tensor([5.0, 0.0, 0.0]).double(), present.logical_not(), 0.5)
    assert torch.allclose(absent, weights)  # groups the batch lacks take no step


def test_example_weights_share_the_replayed_examples_count_by_group_weight():
    groups = torch.tensor([-1, 0, 1, 1, 2])
    assert torch.allclose(mitigations.example_weights(groups, torch.full((3,), 1 / 3)), torch.ones(5))
    weights = mitigations.example_weights(groups, torch.tensor([0.5, 0.2, 0.3]))
    # four replayed examples share a total weight of 4 in proportion 0.5 : 0.2 : 0.2 : 0.3 (sum 1.2)
    assert torch.allclose(weights, torch.tensor([1.0, 4 * 0.5 / 1.2, 4 * 0.2 / 1.2, 4 * 0.2 / 1.2, 4 * 0.3 / 1.2]))
    assert float(weights[1:].sum()) == pytest.approx(4.0)
    assert mitigations.example_weights(torch.tensor([-1, -1]), torch.tensor([0.5, 0.5])).tolist() == [1.0, 1.0]
