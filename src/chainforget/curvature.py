"""Curvature of the training loss: Hessian-vector products, power iteration for the top (largest) eigenvalue,
the sharpness of a minimum, and Hutchinson's trace estimate.

The gradient graph is built once (``create_graph=True``); every Hessian-vector product is one more
backward pass through it. Framework-free: give it a loss closure and the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Curvature:
    top_eigenvalue: float
    iterations: int
    converged: bool
    trace: float | None
    num_parameters: int
    dominant_eigenvalue: float  # of largest magnitude: the top one unless a negative one is larger in size


# What ``top_eigenvalue`` measures (records and cached measurements name it): the largest eigenvalue. Before
# 2026-12-01 it was the eigenvalue of largest magnitude, which LoRA's bilinear B A makes negative at some minima.
METHOD = "largest-algebraic"


class HessianOperator:
    """``v -> H v`` for the Hessian of ``loss_fn()`` w.r.t. ``parameters`` at their current values."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], parameters: list[torch.Tensor]):
        self.parameters = parameters
        loss = loss_fn()
        self.grads = torch.autograd.grad(loss, parameters, create_graph=True)

    def __call__(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        products = torch.autograd.grad(
            self.grads, self.parameters, grad_outputs=vectors, retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if hv is None else hv.detach() for p, hv in zip(self.parameters, products)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def top_eigenvalue(
    hvp: HessianOperator, *, max_iter: int = 30, tol: float = 1e-3, seed: int = 0
) -> tuple[float, float, int, bool]:
    """The largest eigenvalue: ``(largest, of largest magnitude, iterations, converged)``.

    Power iteration finds the eigenvalue of largest magnitude, ``d``. Where it is negative (LoRA's bilinear
    ``B A`` gives the loss directions of negative curvature, which can outweigh the positive ones at a minimum),
    power iteration on ``H - d I``, whose eigenvalues ``l - d`` are all >= 0, finds ``l_max - d``. Each run stops
    when the Rayleigh quotient changes by less than ``tol`` relative to its size; ``max_iter`` is per run.
    """
    dominant, iterations, converged = power_iteration(hvp, max_iter=max_iter, tol=tol, seed=seed)
    if dominant >= 0:
        return dominant, dominant, iterations, converged
    shifted = lambda vector: [hv - dominant * v for hv, v in zip(hvp(vector), vector)]  # noqa: E731
    gap, more, settled = power_iteration(shifted, max_iter=max_iter, tol=tol, seed=seed, like=hvp.parameters)
    return gap + dominant, dominant, iterations + more, converged and settled


def power_iteration(
    operator: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    *,
    max_iter: int,
    tol: float,
    seed: int,
    like: list[torch.Tensor] | None = None,
) -> tuple[float, int, bool]:
    """``(eigenvalue of largest magnitude, iterations, converged)`` of a symmetric ``operator`` on vectors shaped like
    ``like`` (default: a ``HessianOperator``'s parameters)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = like if like is not None else operator.parameters
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in shapes]
    norm = _dot(vector, vector) ** 0.5
    vector = [v / norm for v in vector]
    eigenvalue = 0.0
    for iteration in range(1, max_iter + 1):
        product = operator(vector)
        estimate = _dot(vector, product)
        norm = _dot(product, product) ** 0.5
        if norm == 0.0:
            return 0.0, iteration, True
        vector = [p / norm for p in product]
        if iteration > 1 and abs(estimate - eigenvalue) <= tol * max(abs(estimate), 1e-12):
            return estimate, iteration, True
        eigenvalue = estimate
    return eigenvalue, max_iter, False


def hutchinson_trace(hvp: HessianOperator, *, samples: int, seed: int = 0) -> float:
    """``E[v^T H v]`` over Rademacher vectors ``v``."""
    generator = torch.Generator().manual_seed(seed + 1)
    total = 0.0
    for _ in range(samples):
        probe = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in hvp.parameters]
        total += _dot(probe, hvp(probe))
    return total / samples


def measure(
    loss_fn: Callable[[], torch.Tensor],
    parameters: list[torch.Tensor],
    *,
    max_iter: int = 30,
    tol: float = 1e-3,
    trace_samples: int = 0,
    seed: int = 0,
) -> Curvature:
    """Top eigenvalue (and optionally the trace) of the Hessian of ``loss_fn()`` w.r.t. ``parameters``."""
    hvp = HessianOperator(loss_fn, parameters)
    eigenvalue, dominant, iterations, converged = top_eigenvalue(hvp, max_iter=max_iter, tol=tol, seed=seed)
    trace = hutchinson_trace(hvp, samples=trace_samples, seed=seed) if trace_samples > 0 else None
    return Curvature(eigenvalue, iterations, converged, trace, sum(p.numel() for p in parameters), dominant)
