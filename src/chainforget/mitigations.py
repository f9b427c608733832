"""The mitigations of forgetting, framework-free: what each is (``MITIGATIONS``) and its maths (L2-SP, EWC, LwF
and the SAM perturbation).

Each takes one strength knob (penalty weight lambda, SAM radius rho, replay ratio r); at strength 0 each is
exactly plain fine-tuning. Adding one: its maths and one ``MITIGATIONS`` entry here, a config snippet in
``sweeps/configs/mitigations/`` and its test; the config, the stage plan, the Lightning module and analysis
read the entry. Replay is data, not a loss: the stage plan (``chainforget.plan``) works out its mixtures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StepState:
    """What a penalty may read at one training step.

    Args:
        parameters: the trainable parameters (the ones the optimizer moves).
        logits: the batch's answer-letter logits (examples x option letters); ``None`` when the stage trains text
            answers (``train.answer: text``), which no letter distribution describes.
        anchor: the trainable parameters at the stage's start (when the mitigation ``needs`` it).
        fisher: EWC's diagonal Fisher of the previous stage's data (when it ``needs`` it).
        teacher: the stage-start model's answer-letter logits on the batch's examples (when it ``needs`` it).
    """

    parameters: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    anchor: dict[str, torch.Tensor] | None = None
    fisher: dict[str, torch.Tensor] | None = None
    teacher: torch.Tensor | None = None


@dataclass(frozen=True)
class Mitigation:
    """How one mitigation enters a chain.

    Args:
        kind: ``penalty`` (a term added to each step's loss), ``sam`` (SAM's two-pass step), ``replay`` (data:
            the stage plan mixes earlier tasks' examples into a stage) or ``none``.
        knobs: the ``mitigation`` settings it reads besides its name; analysis treats the others as inactive.
        strength_is: what the strength is, ending in its symbol (for messages and labels).
        max_strength: the largest strength allowed (replay ratios are shares).
        first_stage: the first stage it applies to unless ``mitigation.stages`` says otherwise (2 for what
            protects an earlier stage, 1 for SAM, which shapes each stage's own minimum).
        adds_stage: replay as an extra last stage (the paper's) instead of inside the later stages.
        needs: the stage-start state its penalty reads: ``anchor``, ``fisher`` or ``teacher`` (see ``StepState``).
        penalty: the loss term, from the step's state and the ``mitigation`` settings.
    """

    kind: Literal["none", "penalty", "sam", "replay"]
    knobs: tuple[str, ...] = ("strength", "stages")
    strength_is: str = "penalty weight lambda"
    max_strength: float = math.inf
    first_stage: int = 2
    adds_stage: bool = False
    needs: frozenset[str] = frozenset()
    penalty: Callable[[StepState, object], torch.Tensor] | None = None


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


REPLAY = "replay ratio r"
MITIGATIONS: dict[str, Mitigation] = {
    "none": Mitigation("none", knobs=()),
    "replay_stage": Mitigation("replay", knobs=("strength",), strength_is=REPLAY, max_strength=1.0, adds_stage=True),
    "replay_mix": Mitigation("replay", strength_is=REPLAY, max_strength=1.0),
    "l2sp": Mitigation(
        "penalty",
        needs=frozenset({"anchor"}),
        penalty=lambda step, spec: l2sp_penalty(step.parameters, step.anchor, spec.strength),
    ),
    "ewc": Mitigation(
        "penalty",
        knobs=("strength", "stages", "fisher_batches"),
        needs=frozenset({"anchor", "fisher"}),
        penalty=lambda step, spec: ewc_penalty(step.parameters, step.anchor, step.fisher, spec.strength),
    ),
    "lwf": Mitigation(
        "penalty",
        knobs=("strength", "stages", "temperature"),
        needs=frozenset({"teacher"}),
        penalty=lambda step, spec: lwf_penalty(step.logits, step.teacher, spec.temperature, spec.strength),
    ),
    "sam": Mitigation("sam", strength_is="radius rho", first_stage=1),
}


def facts(name: str) -> dict:
    """What a run record states about its mitigation, so analysis need not know the registry."""
    rule = MITIGATIONS[name]
    return {"name": name, "kind": rule.kind, "knobs": list(rule.knobs)}
