"""Curvature of the training loss: Hessian-vector products, Lanczos for the top (largest) eigenvalue, the
sharpness of a minimum, and Hutchinson's trace estimate.

The gradient graph is built once (``create_graph=True``); every Hessian-vector product is one more
backward pass through it. Framework-free: give it a loss closure and the parameters.
"""

from __future__ import annotations

import math
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


# How ``top_eigenvalue`` is measured (records and cached measurements name it): the largest eigenvalue by Lanczos.
# Before 2026-12-02 it was power iteration, which finds the eigenvalue of largest magnitude: a negative one for some
# LoRA stages.
METHOD = "lanczos-largest"


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
    """The largest eigenvalue by Lanczos (scipy's ``eigsh``, ``which="LA"``): ``(eigenvalue, Hessian-vector
    products, converged)``, with about ``max_iter`` products (a Krylov space of up to 20 vectors, restarted).

    Not power iteration: that finds the eigenvalue of largest magnitude, which LoRA's bilinear ``B A`` can make a
    negative one at the end of a stage, and shifting by it leaves the top eigenvalue beside a bulk of near-zero ones
    that power iteration cannot tell apart in a few dozen products; Lanczos can.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    shapes = [p.shape for p in hvp.parameters]
    sizes = [p.numel() for p in hvp.parameters]
    products = 0

    def matvec(flat: np.ndarray) -> np.ndarray:
        nonlocal products
        products += 1
        pieces = torch.from_numpy(np.ascontiguousarray(flat).ravel()).split(sizes)
        vectors = [v.view(shape).to(p) for v, shape, p in zip(pieces, shapes, hvp.parameters)]
        return torch.cat([hv.double().flatten().cpu() for hv in hvp(vectors)]).numpy()

    n = sum(sizes)
    operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(n)
    ncv = min(n, 20)
    try:
        (value,) = eigsh(
            operator,
            k=1,
            which="LA",
            v0=start,
            ncv=ncv,
            tol=tol,
            maxiter=max(1, -(-max_iter // ncv)),
            return_eigenvectors=False,
        )
        return float(value), products, True
    except ArpackNoConvergence as unfinished:
        values = unfinished.eigenvalues
        return (float(values.max()) if len(values) else math.nan), products, False


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
