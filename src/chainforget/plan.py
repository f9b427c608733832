"""The stage plan: what every stage of a chain draws from, trains, replays and applies, decided once from the
config. The runner, the metrics and the run record read it; nothing downstream re-derives it. Replay (the
paper's mitigation) is data, so its mixtures are worked out here, with a share r of earlier tasks' examples."""

from __future__ import annotations

from dataclasses import dataclass

from chainforget import tasks
from chainforget.config import ChainConfig, CurvatureSpec, MitigationSpec, parse_stage
from chainforget.errors import ConfigError


@dataclass(frozen=True)
class StagePlan:
    """One stage.

    Args:
        index: 1-based (stage 0 is the base model).
        entry: the mixture it draws its training examples from, as a stage entry (``csqa:0.95+bbq:0.05``).
        trains: the tasks whose training stage this is: the largest weight of the stage as the user wrote it,
            so replayed data never counts as training a task.
        replays: earlier tasks a replay mitigation mixed into this stage (their share may be 0).
        mitigation: the penalty or SAM step active in this stage's training (``None`` where none is; replay
            shows in ``entry`` and ``replays``).
        curvature: whether the Hessian is measured at the end of this stage.
        seed: the stage's seed (data order, adapters' dropout, ...).
    """

    index: int
    entry: str
    trains: tuple[str, ...]
    replays: tuple[str, ...]
    mitigation: MitigationSpec | None
    curvature: bool
    seed: int

    @property
    def mixture(self) -> dict[str, float]:
        return parse_stage(self.entry)


def replay_mixture(mixture: dict[str, float], earlier: list[str], ratio: float) -> str:
    """A stage entry training on ``mixture`` scaled by ``1 - ratio`` plus ``ratio`` shared equally by the
    ``earlier`` tasks, e.g. ``({"csqa": 1}, ["bbq"], 0.05)`` -> ``"csqa:0.95+bbq:0.05"``."""
    weights = {name: (1.0 - ratio) * weight for name, weight in mixture.items()}
    for name in earlier:
        weights[name] = weights.get(name, 0.0) + ratio / len(earlier)
    return "+".join(f"{name}:{weight:.6g}" for name, weight in weights.items() if weight > 0)


def apply_replay(order: list[str], spec: MitigationSpec) -> list[str]:
    """The chain's stage entries with replay applied.

    A replay that ``adds_stage`` (``replay_stage``) appends one stage: the last stage's tasks plus a share r of
    every earlier task (the paper's third stage; r = 0 is the control that just trains longer). Otherwise
    (``replay_mix``) that mixture goes inside each stage from ``first_stage`` on (or ``stages``).
    """
    rule = spec.rule
    if rule.kind != "replay":
        return list(order)
    share = getattr(spec, rule.share_knob)
    if rule.adds_stage:
        return [*order, replay_mixture(parse_stage(order[-1]), earlier_tasks(order, len(order) + 1), share)]
    return [
        replay_mixture(parse_stage(entry), earlier_tasks(order, index), share)
        if spec.applies_to(index) and earlier_tasks(order, index)
        else entry
        for index, entry in enumerate(order, start=1)
    ]


def earlier_tasks(order: list[str], stage: int) -> list[str]:
    """Tasks trained before ``stage`` (1-based) that stage ``stage`` does not train itself."""
    current = parse_stage(order[stage - 1]) if stage <= len(order) else parse_stage(order[-1])
    seen = [name for entry in order[: stage - 1] for name in parse_stage(entry)]
    return [name for name in dict.fromkeys(seen) if name not in current]


def plan_chain(config: ChainConfig) -> list[StagePlan]:
    """The chain's stages, once the mitigation has what it needs from them (``check_safety_direction``,
    ``check_group_kind``): a bad chain stops here, before anything loads."""
    check_safety_direction(config)
    check_group_kind(config)
    return plan_stages(config.order, config.mitigation, config.curvature, config.seed)


def check_safety_direction(config: ChainConfig) -> None:
    """A mitigation that keeps to the safety direction reads the update of the chain's safety stage
    (``safety_stage``) layer by layer as a LoRA update ``B @ A`` and acts in the stages after it: it needs LoRA,
    a stage that trains a safety task and one after it; the projection also needs that stage first (only an update
    from the base model's ``B = 0`` stays a rank-r adapter once projected)."""
    mitigation = config.mitigation
    if "safety" not in mitigation.rule.needs:
        return
    if config.model.finetune != "lora":
        raise ConfigError(
            f"mitigation.name: {mitigation.name} works on each adapted layer's low-rank update and needs "
            f"model.finetune: lora, not {config.model.finetune}"
        )
    stage = safety_stage(config.order)
    if stage is None:
        raise ConfigError(
            f"mitigation.name: {mitigation.name} keeps to the update of the stage that trains a safety task, and "
            f"order {config.order} trains none"
        )
    if stage == len(config.order):
        raise ConfigError(
            f"mitigation.name: {mitigation.name} acts in the stages after the one that trains a safety task, and "
            f"order {config.order} trains it last; add a stage after it"
        )
    if mitigation.rule.kind == "projection" and stage > 1:
        raise ConfigError(
            f"mitigation.name: {mitigation.name} projects onto the update of the chain's first stage, and order "
            f"{config.order} first trains a safety task at stage {stage}; put it first"
        )


def check_group_kind(config: ChainConfig) -> None:
    """group_replay weighs the replayed examples by group: at least one replayed task must have groups (one without
    stays ungrouped, weight 1), and a ``group_kind`` given must be one of each grouped replayed task's kinds."""
    mitigation = config.mitigation
    if not mitigation.rule.weighs_replay:
        return
    replayed = {name: tasks.get(name).group_kinds for name in earlier_tasks(config.order, len(config.order) + 1)}
    if not any(replayed.values()):
        raise ConfigError(
            f"mitigation.name: {mitigation.name} weighs replayed examples by group, and the tasks order "
            f"{config.order} replays ({', '.join(replayed) or 'none'}) have no groups; use replay_stage"
        )
    kind = mitigation.group_kind
    for name, kinds in replayed.items():
        if kind is not None and kinds and kind not in kinds:
            raise ConfigError(
                f"mitigation.group_kind: {kind!r} is not a group kind of {name} (it has: {', '.join(kinds)})"
            )


def safety_stage(order: list[str]) -> int | None:
    """The first stage whose (largest-weight) task is a safety task: the update the safety-direction mitigations
    keep to."""
    for index, entry in enumerate(order, start=1):
        weights = parse_stage(entry)
        if any(tasks.get(name).role == "safety" for name, w in weights.items() if w == max(weights.values())):
            return index
    return None


def plan_stages(order: list[str], mitigation: MitigationSpec, curvature: CurvatureSpec, seed: int) -> list[StagePlan]:
    """The stages of ``order`` with ``mitigation`` applied: ``replay_stage`` adds a stage that repeats the last
    one with replayed data mixed in, ``replay_mix`` mixes replayed data into later stages; one that keeps to the
    safety direction acts only in the stages after the safety stage (none where no stage follows it)."""
    entries = apply_replay(order, mitigation)
    written = [*order, order[-1]] if mitigation.rule.adds_stage else list(order)
    trains_with = mitigation.rule.kind in ("penalty", "sam", "projection")  # replay acts through the entries
    after = safety_stage(order) if "safety" in mitigation.rule.needs else 0
    plans = []
    for index, (entry, as_written) in enumerate(zip(entries, written), start=1):
        weights = parse_stage(as_written)
        rewritten = mitigation.rule.kind == "replay" and (index > len(order) or entry != as_written)
        plans.append(
            StagePlan(
                index=index,
                entry=entry,
                trains=tuple(name for name, weight in weights.items() if weight == max(weights.values())),
                replays=tuple(earlier_tasks(order, index)) if rewritten else (),
                mitigation=mitigation
                if (trains_with and mitigation.applies_to(index) and index > after)
                or (mitigation.rule.weighs_replay and rewritten)
                else None,
                curvature=curvature.applies_to(index),
                seed=seed + index,
            )
        )
    return plans


def trained_at(plans: list[StagePlan]) -> dict[str, int]:
    """Each task's training stage: the last stage that trains it."""
    return {task: plan.index for plan in plans for task in plan.trains}
