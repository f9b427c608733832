"""Curvature of the training loss: Hessian-vector products, LOBPCG for the top (largest) eigenvalue, the
sharpness of a minimum, and Hutchinson's trace estimate.

The gradient graph is built once (``create_graph=True``); every Hessian-vector product is one more
backward pass through it. Framework-free: give it a loss closure and the parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Curvature:
    top_eigenvalue: float
    iterations: int
    converged: bool
    trace: float | None
    num_parameters: int


# How ``top_eigenvalue`` is measured (records and cached measurements name it): the largest eigenvalue by LOBPCG.
# Before 2026-12-02 it was power iteration, which finds the eigenvalue of largest magnitude: a negative one for some
# LoRA stages.
METHOD = "largest-lobpcg"


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
) -> tuple[float, int, bool]:
    """The largest eigenvalue by LOBPCG (scipy's ``lobpcg``, ``largest=True``, one vector): ``(eigenvalue,
    Hessian-vector products, converged)``, at most ``max_iter`` iterations of one product each; converged when the
    residual norm is at most ``tol``. Where it is not, the value is LOBPCG's best estimate so far, never NaN.

    Not power iteration: that finds the eigenvalue of largest magnitude, which LoRA's bilinear ``B A`` can make a
    negative one at the end of a stage, and shifting by it leaves the top eigenvalue beside a bulk of near-zero ones
    that power iteration cannot tell apart in a few dozen products.
    """
    from scipy.sparse.linalg import LinearOperator, lobpcg

    shapes = [p.shape for p in hvp.parameters]
    sizes = [p.numel() for p in hvp.parameters]
    products = 0

    def apply(block: np.ndarray) -> np.ndarray:
        nonlocal products
        columns = []
        for column in np.asarray(block).reshape(sum(sizes), -1).T:
            products += 1
            pieces = torch.from_numpy(np.ascontiguousarray(column)).split(sizes)
            vectors = [v.view(shape).to(p) for v, shape, p in zip(pieces, shapes, hvp.parameters)]
            columns.append(torch.cat([hv.double().flatten().cpu() for hv in hvp(vectors)]).numpy())
        return np.stack(columns, axis=1)

    start = np.random.default_rng(seed).standard_normal((sum(sizes), 1))
    if not np.any(apply(start)):  # a Hessian that is zero (the loss does not depend on these parameters)
        return 0.0, products, True
    operator = LinearOperator((sum(sizes),) * 2, matvec=apply, matmat=apply, dtype=np.float64)
    with warnings.catch_warnings():  # "exited at iteration ... not reaching the requested tolerance": see residuals
        warnings.simplefilter("ignore", UserWarning)
        found = lobpcg(operator, start, largest=True, maxiter=max_iter, tol=tol, retResidualNormsHistory=True)
    if len(found) == 2:  # a problem too small for LOBPCG: scipy solved it densely, exactly
        return float(found[0][0]), products, True
    values, _, residuals = found
    final = float(np.max(residuals[-1])) if len(residuals) else 0.0
    return float(values[0]), products, final <= tol


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
    eigenvalue, iterations, converged = top_eigenvalue(hvp, max_iter=max_iter, tol=tol, seed=seed)
    trace = hutchinson_trace(hvp, samples=trace_samples, seed=seed) if trace_samples > 0 else None
    return Curvature(eigenvalue, iterations, converged, trace, sum(p.numel() for p in parameters))
