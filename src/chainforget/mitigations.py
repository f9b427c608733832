"""The mitigations of forgetting, framework-free: what each is (``MITIGATIONS``) and its maths (L2-SP, EWC, LwF,
the SAM perturbation, and the safety direction's anchor and projection).

Each takes one strength knob (penalty weight lambda, SAM radius rho, replay ratio r, similarity threshold tau); at
strength 0 each is exactly plain fine-tuning. Adding one: its maths and one ``MITIGATIONS`` entry here, a config
snippet in ``sweeps/configs/mitigations/`` and its test; the config, the stage plan, the Lightning module and
analysis read the entry. Replay is data, not a loss: the stage plan (``chainforget.plan``) works out its mixtures.
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
        safety: the safety subspace of every adapted layer (when it ``needs`` it; see ``SafetyLayer``).
    """

    parameters: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    anchor: dict[str, torch.Tensor] | None = None
    fisher: dict[str, torch.Tensor] | None = None
    teacher: torch.Tensor | None = None
    safety: dict[str, SafetyLayer] | None = None


@dataclass(frozen=True)
class SafetyLayer:
    """One LoRA-adapted linear layer and its safety subspace.

    Args:
        lora_a: name of its ``A`` (rank x in) among the trainable parameters.
        lora_b: name of its ``B`` (out x rank); the layer's weight is ``W0 + scale * B @ A``.
        scale: LoRA's ``alpha / rank``.
        basis: orthonormal columns (out x k) spanning the update of the stage that trained the safety task
            (``update_basis``): the subspace the safety tuning moved this layer's outputs in.
    """

    lora_a: str
    lora_b: str
    scale: float
    basis: torch.Tensor


@dataclass(frozen=True)
class Mitigation:
    """How one mitigation enters a chain.

    Args:
        kind: ``penalty`` (a term added to each step's loss), ``sam`` (SAM's two-pass step), ``replay`` (data:
            the stage plan mixes earlier tasks' examples into a stage), ``projection`` (an edit of the weights
            once a stage has trained) or ``none``.
        knobs: the ``mitigation`` settings it reads besides its name; analysis treats the others as inactive.
        strength_is: what the strength is, ending in its symbol (for messages and labels).
        min_strength, max_strength: the strengths allowed (replay ratios are shares, similarities cosines).
        first_stage: the first stage it applies to unless ``mitigation.stages`` says otherwise (2 for what
            protects an earlier stage, 1 for SAM, which shapes each stage's own minimum).
        adds_stage: replay as an extra last stage (the paper's) instead of inside the later stages.
        share_knob: the setting that holds replay's share r (``strength`` unless the strength is another knob).
        weighs_replay: it also weighs the replayed examples' loss in the stage that replays them (group_replay).
        needs: the stage-start state its penalty reads: ``anchor``, ``fisher``, ``teacher`` or ``safety`` (see
            ``StepState``).
        penalty: the loss term, from the step's state and the ``mitigation`` settings.
    """

    kind: Literal["none", "penalty", "sam", "replay", "projection"]
    knobs: tuple[str, ...] = ("strength", "stages")
    strength_is: str = "penalty weight lambda"
    min_strength: float = 0.0
    max_strength: float = math.inf
    first_stage: int = 2
    adds_stage: bool = False
    share_knob: str = "strength"
    weighs_replay: bool = False
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


def update_basis(update: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Orthonormal columns spanning a layer's update ``V`` (out x in): its left singular vectors whose singular
    value is above ``rtol`` times the largest (a LoRA update ``scale * B @ A`` has at most ``rank``)."""
    u, sigma, _ = torch.linalg.svd(update.double(), full_matrices=False)
    keep = sigma > rtol * sigma[0] if sigma.numel() and sigma[0] > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    return u[:, keep].to(torch.promote_types(update.dtype, torch.float32))  # orthonormal enough even under bf16


def off_subspace(update: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(I - Q Q^T) U``: the part of ``update`` outside the span of ``basis``'s orthonormal columns ``Q``."""
    return update - basis @ (basis.T @ update)


def safety_anchor_penalty(
    parameters: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    layers: dict[str, SafetyLayer],
    strength: float,
) -> torch.Tensor:
    """``strength / 2 * sum_l ||(I - Q_l Q_l^T) dW_l||_F^2``, with ``dW_l = scale (B A - B_0 A_0)`` the layer's update
    since the stage started and ``Q_l`` its safety subspace: only moves outside the directions the safety tuning
    moved in are paid for (after AsFT, Yang et al. 2025, who anchor fine-tuning to the alignment direction
    ``W_aligned - W_base``; here the chain's own safety stage gives it)."""
    total = 0.0
    device = next(iter(parameters.values())).device.type
    with torch.autocast(device, enabled=False):  # in the parameters' own precision, not the forward pass's
        for layer in layers.values():
            a, b = parameters[layer.lora_a], parameters[layer.lora_b]
            update = layer.scale * (b @ a - anchor[layer.lora_b] @ anchor[layer.lora_a])
            total = total + (off_subspace(update, layer.basis.to(update)) ** 2).sum()
    return 0.5 * strength * total


@torch.no_grad()
def project_update(
    b: torch.Tensor, a: torch.Tensor, layer: SafetyLayer, safety_b: torch.Tensor, safety_a: torch.Tensor, tau: float
) -> tuple[torch.Tensor | None, float]:
    """Safe LoRA's projection (Hsu et al., NeurIPS 2024) of one layer's update since the safety stage,
    ``U = scale (B A - B_s A_s)``, onto the safety subspace: with ``C = Q Q^T`` the exact projection onto it, the
    similarity ``cos(U, C U) = ||C U||_F / ||U||_F``; below ``tau`` the layer keeps ``C U`` instead of ``U``.

    Returns the projected ``B`` (``C B``: since ``C B_s A_s = B_s A_s`` when ``B_s A_s`` is the safety update
    itself, ``W_s + C U = W_0 + scale (C B) A``, still a rank-r adapter) or ``None`` where the layer is kept, and the
    similarity. tau = -1 (or 0) projects no layer; tau = 1 every layer not already inside the subspace. Safe LoRA
    uses ``V V^T / ||V||_F`` for ``C``, a cheaper stand-in for the exact projection, which no rank-r adapter could
    hold here."""
    basis, b64 = layer.basis.to(device=b.device, dtype=torch.float64), b.double()
    update = layer.scale * (b64 @ a.double() - safety_b.double() @ safety_a.double())
    norm = torch.linalg.matrix_norm(update)
    if norm == 0:
        return None, 1.0
    # a ratio of float64 norms, off by ~1e-16 in a BLAS's own way: rounded, a layer inside the subspace reads 1
    similarity = round(float(torch.linalg.matrix_norm(basis @ (basis.T @ update)) / norm), 12)
    if similarity >= tau:
        return None, similarity
    return (basis @ (basis.T @ b64)).to(b.dtype), similarity


def safety_layers(
    layers: dict[str, tuple[str, str, float]], before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> dict[str, SafetyLayer]:
    """Each adapted layer (``models.lora_layers``: names of ``A``, ``B`` and the scale) with the subspace of its
    update over the safety stage, ``scale (B A - B_0 A_0)`` from the weights ``before`` and ``after`` it."""
    return {
        name: SafetyLayer(a, b, scale, update_basis(scale * (after[b] @ after[a] - before[b] @ before[a])))
        for name, (a, b, scale) in layers.items()
    }


@torch.no_grad()
def project_layers(
    parameters: dict[str, torch.Tensor], layers: dict[str, SafetyLayer], safety: dict[str, torch.Tensor], tau: float
) -> dict:
    """Apply ``project_update`` to every layer in place, against the weights ``safety`` the safety stage ended
    with; returns the layers projected and every layer's similarity."""
    projected, similarity = [], {}
    for name, layer in layers.items():
        a, b = parameters[layer.lora_a], parameters[layer.lora_b]
        safety_b, safety_a = safety[layer.lora_b].to(b), safety[layer.lora_a].to(a)
        new_b, similarity[name] = project_update(b, a, layer, safety_b, safety_a, tau)
        if new_b is not None:
            b.copy_(new_b)
            projected.append(name)
    return {"projected": projected, "similarity": similarity}


def group_loss_sums(losses: torch.Tensor, groups: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number of examples of each of ``count`` groups (``groups``; -1: no group): what data-parallel
    ranks add up before the mean loss of each group is taken."""
    labelled = groups >= 0
    sums = losses.new_zeros(count).index_add_(0, groups[labelled], losses[labelled])
    return sums, torch.bincount(groups[labelled], minlength=count).to(losses.dtype)


@torch.no_grad()
def group_dro_step(
    weights: torch.Tensor, group_losses: torch.Tensor, present: torch.Tensor, eta: float
) -> torch.Tensor:
    """Group DRO's exponentiated-gradient step (Sagawa et al., ICLR 2020): ``q_g <- q_g exp(eta l_g)`` for the groups
    the batch has, then ``q / sum(q)``; the weight moves toward the groups whose loss is highest. eta = 0 keeps q."""
    step = torch.where(present, eta * group_losses, torch.zeros_like(group_losses))
    raised = weights * torch.exp(step - step.max())  # the common factor cancels in the normalisation
    return raised / raised.sum()


def example_weights(groups: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each example's loss weight: 1 for an example without a group (-1); the replayed examples of the batch share
    their number between them in proportion to their groups' weights, ``w_i = n q_(g_i) / sum_j q_(g_j)`` over its n
    replayed examples. Replay's total weight stays n (its share r), the batch's replayed loss is ``q``-weighted as
    group DRO's ``sum_g q_g l_g``, and a uniform ``q`` weighs every example 1, today's replay."""
    replayed = groups >= 0
    chosen = weights[groups.clamp(min=0)] * replayed
    scaled = chosen * (replayed.sum() / chosen.sum().clamp(min=torch.finfo(chosen.dtype).tiny))
    return torch.where(replayed, scaled, torch.ones_like(scaled))


REPLAY = "replay ratio r"
MITIGATIONS: dict[str, Mitigation] = {
    "none": Mitigation("none", knobs=()),
    "replay_stage": Mitigation("replay", knobs=("strength",), strength_is=REPLAY, max_strength=1.0, adds_stage=True),
    "replay_mix": Mitigation("replay", strength_is=REPLAY, max_strength=1.0),
    # replay_stage whose replayed examples are weighted by group (example_weights), the weights moved by group DRO
    # (group_dro_step) toward the groups the stage makes worst: after Vulnerability-Aware Alignment (ICML 2025)
    "group_replay": Mitigation(
        "replay",
        knobs=("strength", "replay_share", "group_kind"),
        strength_is="DRO step size eta",
        adds_stage=True,
        share_knob="replay_share",
        weighs_replay=True,
    ),
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
    "safety_anchor": Mitigation(
        "penalty",
        needs=frozenset({"anchor", "safety"}),
        penalty=lambda step, spec: safety_anchor_penalty(step.parameters, step.anchor, step.safety, spec.strength),
    ),
    "safety_projection": Mitigation(
        "projection",
        strength_is="similarity threshold tau",
        min_strength=-1.0,
        max_strength=1.0,
        needs=frozenset({"safety"}),
    ),
}


def facts(name: str) -> dict:
    """What a run record states about its mitigation, so analysis need not know the registry."""
    rule = MITIGATIONS[name]
    return {"name": name, "kind": rule.kind, "knobs": list(rule.knobs)}
