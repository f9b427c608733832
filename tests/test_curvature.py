import pytest
import torch

from chainforget import curvature
from chainforget.config import ModelSpec
from chainforget.models import load_model, tiny_tokenizer
from chainforget.scoring import encode_prompt, left_pad, letter_token_ids
from chainforget.tasks import multiple_choice_prompt
from lightning_modules.stage import answer_loss


def quadratic(eigenvalues):
    """0.5 x^T A x + b^T x with A = Q diag(eigenvalues) Q^T for a fixed rotation Q."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    matrix = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    x = torch.randn(len(eigenvalues), generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(len(eigenvalues), generator=generator, dtype=torch.float64)
    return (lambda: 0.5 * x @ matrix @ x + b @ x), x


def test_top_eigenvalue_of_a_known_quadratic_within_one_percent():
    loss, x = quadratic([5.0, 2.0, 1.0, 0.5, 0.1, 0.05])
    result = curvature.measure(loss, [x], max_iter=200, tol=1e-6, seed=3)
    assert result.converged
    assert result.top_eigenvalue == pytest.approx(5.0, rel=0.01)


def test_the_top_eigenvalue_is_the_largest_beside_a_larger_negative_one_and_a_bulk_near_zero():
    """The case that defeats power iteration at a LoRA stage's end: a negative eigenvalue of the largest magnitude,
    and the top one just above a bulk of near-zero ones (a shift by the negative one leaves them a ratio of 1.2)."""
    bulk = torch.linspace(-0.01, 0.01, 300).tolist()
    loss, x = quadratic([-5.0, 1.0, *bulk])
    result = curvature.measure(loss, [x], max_iter=60, tol=1e-6, seed=3)
    assert result.converged and result.iterations <= 62
    assert result.top_eigenvalue == pytest.approx(1.0, rel=1e-3)
    # a crowded top end that 5 iterations cannot settle: the best estimate so far, not NaN
    loss, x = quadratic((torch.linspace(0, 1, 400) ** 3).tolist())
    rough = curvature.measure(loss, [x], max_iter=5, tol=1e-9, seed=3)
    assert not rough.converged and 0.5 < rough.top_eigenvalue <= 1.0 + 1e-9
    loss, x = quadratic([-5.0, -2.0, -1.0])  # every eigenvalue negative: the largest is the one nearest zero
    assert curvature.measure(loss, [x], max_iter=60, tol=1e-8).top_eigenvalue == pytest.approx(-1.0, rel=1e-3)


def test_a_hessian_that_is_zero_has_top_eigenvalue_zero():
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    result = curvature.measure(lambda: (0.0 * x * x).sum(), [x], max_iter=10)
    assert (result.top_eigenvalue, result.converged) == (0.0, True)


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    diagonal = torch.tensor([4.0, 0.5, 2.0], dtype=torch.float64)
    result = curvature.measure(lambda: 0.5 * (diagonal * x * x).sum(), [x], max_iter=100, tol=1e-8, trace_samples=5)
    assert result.trace == pytest.approx(6.5)
    assert result.top_eigenvalue == pytest.approx(4.0, rel=1e-3)


def tiny_batch():
    tokenizer = tiny_tokenizer()
    letters = letter_token_ids(tokenizer, 3)
    prompts = [multiple_choice_prompt(f"Which one {i}?", ["a", "b", "c"]) for i in range(4)]
    batch = left_pad([encode_prompt(tokenizer, p, 64) for p in prompts], tokenizer.pad_token_id)
    batch["answer"] = torch.tensor([letters[i % 3] for i in range(4)])
    return batch


def test_power_iteration_on_a_tiny_llama_converges_and_is_reproducible():
    model = load_model(ModelSpec(name="tiny", finetune="lora"), seed=0)
    model.set_attn_implementation("eager")
    batch = tiny_batch()
    parameters = [p for p in model.parameters() if p.requires_grad]
    first = curvature.measure(lambda: answer_loss(model, batch), parameters, max_iter=100, tol=1e-3, seed=7)
    again = curvature.measure(lambda: answer_loss(model, batch), parameters, max_iter=100, tol=1e-3, seed=7)
    assert first.converged and first.iterations <= 100
    assert first.top_eigenvalue == again.top_eigenvalue
    assert first.top_eigenvalue != 0.0
    assert first.num_parameters == sum(p.numel() for p in parameters)
