"""The stage plan: what every stage of a chain draws from, trains, replays and applies, decided once from the
config. The runner, the metrics and the run record read it; nothing downstream re-derives it. Replay (the
paper's mitigation) is data, so its mixtures are worked out here, with a share r of earlier tasks' examples."""

from __future__ import annotations

from dataclasses import dataclass

from chainforget.config import ChainConfig, CurvatureSpec, MitigationSpec, parse_stage


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
    return plan_stages(config.order, config.mitigation, config.curvature, config.seed)


def safety_stage(order: list[str]) -> int | None:
    """The first stage whose (largest-weight) task is a safety task: the update the safety-direction mitigations
    keep to."""
    from chainforget import tasks

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
