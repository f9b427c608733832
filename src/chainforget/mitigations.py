"""The maths of the mitigations, framework-free: L2-SP, EWC, LwF and the SAM perturbation.

Each takes one strength knob (penalty weight lambda, SAM radius rho); at strength 0 each is exactly the plain
fine-tuning objective. Lightning wiring lives in ``lightning_modules/stage.py``. Replay is data, not a loss:
its mixtures are part of the stage plan (``chainforget.plan``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def snapshot(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies (not views) of the parameters: later updates must not move the anchor."""
    return {name: p.detach().clone() for name, p in parameters.items()}


def l2sp_penalty(parameters: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """``strength / 2 * ||theta - theta_prev||^2`` over the trainable parameters."""
    total = sum(((p - anchor[name]) ** 2).sum() for name, p in parameters.items())
    return 0.5 * strength * total


def ewc_penalty(
    parameters: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    strength: float,
) -> torch.Tensor:
    """``strength / 2 * sum_i F_i (theta_i - theta_prev,i)^2`` with a diagonal Fisher ``F``."""
    total = sum((fisher[name] * (p - anchor[name]) ** 2).sum() for name, p in parameters.items())
    return 0.5 * strength * total


def diagonal_fisher(
    parameters: dict[str, torch.Tensor], batch_losses: Iterable[Callable[[], torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: the squared gradient of each batch's mean loss, averaged over batches."""
    names = list(parameters)
    fisher = {name: torch.zeros_like(parameters[name]) for name in names}
    count = 0
    for loss_fn in batch_losses:
        grads = torch.autograd.grad(loss_fn(), [parameters[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
        count += 1
    if count == 0:
        raise ValueError("diagonal_fisher needs at least one batch")
    return {name: value / count for name, value in fisher.items()}


def lwf_penalty(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, strength: float
) -> torch.Tensor:
    """``strength * T^2 * KL(teacher_T || student_T)`` over the answer options, averaged over the batch."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits are upcast, fp64 kept
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return strength * temperature**2 * kl


@torch.no_grad()
def sam_ascent(parameters: list[torch.Tensor], radius: float) -> list[torch.Tensor]:
    """Move the parameters to ``theta + rho * g / ||g||`` (in place) and return the step taken, for
    :func:`sam_descent` to undo after the gradient at the perturbed point is computed."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    scale = radius / (norm + 1e-12)
    steps = [g * scale for g in grads]
    for p, step in zip(parameters, steps):
        p.add_(step)
    return steps


@torch.no_grad()
def sam_descent(parameters: list[torch.Tensor], steps: list[torch.Tensor]) -> None:
    for p, step in zip(parameters, steps):
        p.sub_(step)
