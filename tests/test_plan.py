"""The stage plan, worked out by hand: what each stage draws from, trains, replays and applies."""

from chainforget import plan
from chainforget.config import CurvatureSpec, MitigationSpec


def test_replay_mixtures_by_hand():
    assert plan.replay_mixture({"csqa": 1.0}, ["bbq"], 0.05) == "csqa:0.95+bbq:0.05"
    assert plan.replay_mixture({"csqa": 1.0}, ["bbq", "toxigen"], 0.2) == "csqa:0.8+bbq:0.1+toxigen:0.1"
    assert plan.replay_mixture({"csqa": 1.0}, ["bbq"], 0.0) == "csqa:1"
    assert plan.replay_mixture({"csqa": 1.0}, ["bbq"], 1.0) == "bbq:1"
    order = ["bbq", "csqa"]
    assert plan.apply_replay(order, MitigationSpec("replay_stage", 0.05)) == ["bbq", "csqa", "csqa:0.95+bbq:0.05"]
    assert plan.apply_replay(order, MitigationSpec("replay_mix", 0.1)) == ["bbq", "csqa:0.9+bbq:0.1"]
    three = ["bbq", "csqa", "arc"]
    assert plan.apply_replay(three, MitigationSpec("replay_mix", 0.1, stages=[3])) == [
        "bbq",
        "csqa",
        "arc:0.9+bbq:0.05+csqa:0.05",
    ]
    assert plan.apply_replay(order, MitigationSpec("l2sp", 1.0)) == order


def stages(order, mitigation=MitigationSpec(), curvature=CurvatureSpec(), seed=10):
    return plan.plan_stages(order, mitigation, curvature, seed)


def test_a_plain_chain_trains_each_task_in_its_stage():
    first, second = stages(["bbq", "csqa"])
    assert (first.index, first.entry, first.trains, first.replays, first.seed) == (1, "bbq", ("bbq",), (), 11)
    assert (second.entry, second.trains, second.mitigation, second.curvature) == ("csqa", ("csqa",), None, False)
    assert plan.trained_at([first, second]) == {"bbq": 1, "csqa": 2}


def test_the_replay_stage_retrains_the_last_task_and_replays_the_earlier_even_at_ratio_zero():
    spec = MitigationSpec("replay_stage", 0.05)
    *_, third = stages(["bbq", "csqa"], spec)
    assert (third.index, third.entry, third.trains, third.replays) == (3, "csqa:0.95+bbq:0.05", ("csqa",), ("bbq",))
    assert third.mixture == {"csqa": 0.95, "bbq": 0.05} and third.mitigation is None  # replay is data, not a loss
    assert plan.trained_at(stages(["bbq", "csqa"], spec)) == {"bbq": 1, "csqa": 3}
    control = stages(["bbq", "csqa"], MitigationSpec("replay_stage", 0.0))[2]
    assert (control.entry, control.replays) == ("csqa:1", ("bbq",))  # r = 0: the control that trains longer


def test_replayed_data_never_counts_as_training_even_when_it_dominates():
    *_, last = stages(["bbq", "csqa"], MitigationSpec("replay_mix", 0.8))
    assert last.mixture == {"csqa": 0.2, "bbq": 0.8} and last.trains == ("csqa",) and last.replays == ("bbq",)
    assert plan.trained_at(stages(["bbq", "csqa"], MitigationSpec("replay_mix", 0.8))) == {"bbq": 1, "csqa": 2}


def test_penalties_and_curvature_apply_where_their_specs_say():
    plans = stages(["bbq", "csqa", "arc"], MitigationSpec("ewc", 2.0), CurvatureSpec(enabled=True, stages=[1, 3]))
    assert [p.mitigation.name if p.mitigation else None for p in plans] == [None, "ewc", "ewc"]
    assert [p.curvature for p in plans] == [True, False, True]
    sam = stages(["bbq", "csqa"], MitigationSpec("sam", 0.05))
    assert [p.mitigation.name for p in sam] == ["sam", "sam"]  # SAM applies from the first stage
    mixed = stages(["bbq:3+csqa:1", "arc"])
    assert mixed[0].trains == ("bbq",) and plan.trained_at(mixed) == {"bbq": 1, "arc": 2}
