"""Mitigations and curvature inside real (tiny-model) chains: the controlled effects, not just that they run.

The smoke fixtures make forgetting stark: BBQ's gold answer is mostly C, CSQA's mostly A, so a model tuned on
CSQA after BBQ answers A everywhere unless something holds the BBQ behaviour in place. Given 100 steps the
tiny model can learn to tell the two formats apart, which is what replay needs to pay off.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT

from chainforget.config import CurvatureSpec, MitigationSpec
from chainforget.errors import ConfigError
from lightning_modules.chain import run_chain


def chain(config, name, mitigation=None, steps=20, lr=None, **changes):
    train = replace(config.train, steps=steps, lr=lr or config.train.lr)
    return run_chain(
        replace(config, run_name=name, train=train, mitigation=mitigation or MitigationSpec(), **changes),
        progress=False,
    )


def bbq_forgetting(record):
    (row,) = [r for r in record["metrics"]["forgetting"] if r["task"] == "bbq" and r["group_kind"] == "all"]
    return row["F"]


def test_replay_stage_recovers_what_plain_continued_training_forgets(smoke_config):
    control = chain(smoke_config, "r0", MitigationSpec("replay_stage", 0.0), steps=100, lr=5e-3)
    replayed = chain(smoke_config, "r50", MitigationSpec("replay_stage", 0.5), steps=100, lr=5e-3)
    assert [s["name"] for s in replayed["stages"]] == ["bbq", "csqa", "csqa:0.5+bbq:0.5"]
    assert [s["name"] for s in control["stages"]] == ["bbq", "csqa", "csqa:1"]
    assert bbq_forgetting(replayed) < bbq_forgetting(control) - 20
    third = replayed["stages"][2]["mitigation"]
    assert third["name"] == "replay_stage" and third["strength"] == 0.5
    assert third["replay_ids"]["bbq"] and all(i.startswith(("Age-", "Religion-")) for i in third["replay_ids"]["bbq"])
    assert control["stages"][2]["mitigation"]["replay_ids"] == {"bbq": []}


def test_replay_mix_reduces_forgetting_inside_the_second_stage(smoke_config):
    plain = chain(smoke_config, "plain", steps=100, lr=5e-3)
    mixed = chain(smoke_config, "mixed", MitigationSpec("replay_mix", 0.5), steps=100, lr=5e-3)
    assert mixed["stages"][1]["name"] == "csqa:0.5+bbq:0.5"
    assert bbq_forgetting(mixed) < bbq_forgetting(plain) - 20


# EWC holds only the weights the previous stage's Fisher marks as important (embeddings of tokens BBQ never
# uses drift freely), so halving the plain drift takes a larger lambda than L2-SP needs.
@pytest.mark.parametrize(("name", "strength"), [("l2sp", 1e4), ("ewc", 1e8)])
def test_strong_penalties_hold_the_weights_near_the_previous_stage(smoke_config, name, strength):
    free = chain(smoke_config, f"{name}0", MitigationSpec(name, 0.0))
    held = chain(smoke_config, f"{name}big", MitigationSpec(name, strength))
    free_stage, held_stage = free["stages"][1], held["stages"][1]
    assert free_stage["mitigation"]["mean_penalty"] == 0.0
    assert held_stage["mitigation"]["mean_penalty"] > 0.0
    assert held_stage["train"]["weight_drift"] < 0.5 * free_stage["train"]["weight_drift"]
    assert free["stages"][0]["mitigation"] is None  # stage 1 has no previous stage to hold on to


def test_lwf_and_sam_log_nothing_at_strength_zero_and_something_otherwise(smoke_config):
    off = chain(smoke_config, "lwf0", MitigationSpec("lwf", 0.0), steps=6)
    on = chain(smoke_config, "lwf1", MitigationSpec("lwf", 1.0), steps=6)
    assert off["stages"][1]["mitigation"]["mean_penalty"] == 0.0
    assert on["stages"][1]["mitigation"]["mean_penalty"] > 0.0
    sam = chain(smoke_config, "sam", MitigationSpec("sam", 0.05), steps=6)
    assert [s["mitigation"]["mean_perturbation"] for s in sam["stages"]] == [pytest.approx(0.05)] * 2
    assert all(s["train"]["steps"] == 6 for s in sam["stages"])
    flat = chain(smoke_config, "sam0", MitigationSpec("sam", 0.0), steps=6)
    assert flat["stages"][0]["mitigation"]["mean_perturbation"] == 0.0


def test_curvature_is_recorded_per_stage_and_cached(smoke_config):
    spec = CurvatureSpec(enabled=True, batches=1, max_iter=50, tol=1e-2, trace_samples=2)
    first = chain(smoke_config, "curv", steps=6, curvature=spec)
    for stage in first["stages"]:
        assert stage["curvature"]["converged"] and stage["curvature"]["top_eigenvalue"] != 0.0
        assert stage["curvature"]["trace"] is not None and stage["curvature"]["dtype"] == "float32"
    again = chain(smoke_config, "curv-again", steps=6, curvature=spec)
    assert [s["cache_hit"] for s in again["stages"]] == [True, True]
    assert [s["curvature"] for s in again["stages"]] == [s["curvature"] for s in first["stages"]]


def test_curvature_of_a_cached_stage_measured_in_a_fresh_process_equals_the_first_measurement(smoke_config):
    """The curvature is measured on the trained stage, cached apart from it: a stage read back from the cache whose
    measurement is gone (as after a change of method) is measured again, not retrained, to the same number."""
    import shutil

    spec = CurvatureSpec(enabled=True, batches=1, max_iter=30, tol=1e-3, stages=[1])
    first = chain(smoke_config, "curv", steps=6, curvature=spec)
    measured = first["stages"][0]["curvature"]
    assert measured["method"] == "largest-lobpcg" and measured["converged"]
    cache = Path(smoke_config.cache_dir)
    for entry in cache.iterdir():
        if (entry / "measurement.json").exists():
            shutil.rmtree(entry)
    config = replace(smoke_config, run_name="curv-fresh", train=replace(smoke_config.train, steps=6), curvature=spec)
    written = Path(smoke_config.out).parent / "curv-fresh.yaml"
    written.write_text(yaml.safe_dump(config.to_dict()))
    done = subprocess.run(
        [sys.executable, "-m", "chainforget.cli", "chain", "--config", str(written)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CHAINFORGET_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stage = json.loads((Path(smoke_config.out) / "curv-fresh" / "run.json").read_text())["stages"][0]
    assert stage["cache_hit"] and stage["curvature"] == measured


def test_ewc_outside_a_chain_is_a_clear_error(smoke_config):
    from lightning_modules.stage import StageModule

    module = StageModule(mitigation=MitigationSpec("ewc", 1.0))
    with pytest.raises(ConfigError, match="ewc needs the previous stage's data"):
        module.on_train_start()


@pytest.mark.parametrize("name", ["l2sp", "lwf", "sam"])
def test_mitigations_act_on_lora_adapters_only(smoke_config, name):
    lora = replace(smoke_config.model, finetune="lora")
    record = chain(
        smoke_config, f"lora-{name}", MitigationSpec(name, 1.0 if name != "sam" else 0.05), steps=6, model=lora
    )
    second = record["stages"][1]
    assert second["mitigation"]["mean_penalty" if name != "sam" else "mean_perturbation"] > 0.0
    if name == "l2sp":
        assert 0.0 < second["train"]["weight_drift"]  # the adapters moved against the penalty


def test_a_mitigation_added_to_the_registry_alone_runs_in_a_chain_and_reaches_the_analysis(smoke_config, monkeypatch):
    """What README's "Adding a mitigation" promises: one registry entry (here an L1 pull toward the stage-start
    weights, with its maths inline) and nothing else changed; the config accepts it, the plan applies it from
    stage 2, the module adds and logs its penalty, the record states its knobs and analysis reads them."""
    from analysis.runs import inactive_keys
    from chainforget import mitigations
    from chainforget.plan import plan_chain

    def l1sp(step, spec):
        return spec.strength * sum((p - step.anchor[n]).abs().sum() for n, p in step.parameters.items())

    entry = mitigations.Mitigation("penalty", needs=frozenset({"anchor"}), penalty=l1sp)
    monkeypatch.setitem(mitigations.MITIGATIONS, "l1sp", entry)
    spec = MitigationSpec("l1sp", 0.5)
    assert [plan.mitigation for plan in plan_chain(replace(smoke_config, mitigation=spec))] == [None, spec]

    record = chain(smoke_config, "l1", spec, steps=10)  # logged every 5 steps
    first, second = record["stages"][0]["mitigation"], record["stages"][1]["mitigation"]
    assert first is None and second["name"] == "l1sp" and second["mean_penalty"] > 0.0
    assert record["mitigation"] == {"name": "l1sp", "kind": "penalty", "knobs": ["strength", "stages"]}
    assert {"mitigation.temperature", "mitigation.fisher_batches"} <= set(inactive_keys(record))
    assert "mitigation.strength" not in inactive_keys(record)
    logged = pd.read_csv(Path(smoke_config.out) / "l1" / "lightning_logs" / "stage2" / "metrics.csv")
    assert (logged["train/penalty"].dropna() > 0).all() and len(logged["train/penalty"].dropna()) >= 1


def stage_rows(record, stage):
    return [row for row in record["eval"] if row["stage"] == stage]


@pytest.fixture()
def lora_config(smoke_config):
    """The smoke chain with LoRA adapters (the safety-direction mitigations work on LoRA updates)."""
    return replace(smoke_config, model=replace(smoke_config.model, finetune="lora"))


def test_safety_direction_mitigations_at_strengths_that_do_nothing_are_plain_fine_tuning(lora_config):
    plain = chain(lora_config, "plain")
    for spec in (MitigationSpec("safety_anchor", 0.0), MitigationSpec("safety_projection", -1.0)):
        kept = chain(lora_config, spec.name, spec)
        assert stage_rows(kept, 2) == stage_rows(plain, 2)
    assert kept["stages"][1]["mitigation"]["projected"] == []
    assert len(kept["stages"][1]["mitigation"]["similarity"]) == 8  # q/k/v/o of the tiny model's two layers


def test_safety_projection_keeps_the_later_update_inside_the_safety_subspace(lora_config):
    from safetensors.torch import load_file

    from chainforget import mitigations

    plain = chain(lora_config, "plain", steps=100, lr=5e-3)
    record = chain(lora_config, "projected", MitigationSpec("safety_projection", 1.0), steps=100, lr=5e-3)
    done = record["stages"][1]["mitigation"]
    assert sorted(done["projected"]) == sorted(done["similarity"]) and all(s < 1 for s in done["similarity"].values())
    assert done["wall_s"] < 60  # seconds, not a stage's minutes (the projection trains nothing)
    run = Path(lora_config.out) / "projected"
    first, second = (load_file(run / f"stage{k}" / "adapter_model.safetensors") for k in (1, 2))
    for name in done["projected"]:  # B of stage 2 lies in the span of the stage-1 update (B = 0 before it)
        a_key, b_key = (f"{name}.lora_{x}.weight" for x in "AB")
        basis = mitigations.update_basis(first[b_key].double() @ first[a_key].double())
        b = second[b_key].double()
        assert torch.allclose(basis @ (basis.T @ b), b, atol=1e-5)
    assert bbq_forgetting(record) < bbq_forgetting(plain)


def off_subspace_share(run: Path) -> float:
    """How much of stage 2's update lies outside the span of stage 1's (the safety stage's), summed over layers."""
    from safetensors.torch import load_file

    from chainforget import mitigations

    first, second = (load_file(run / f"stage{k}" / "adapter_model.safetensors") for k in (1, 2))
    outside = total = 0.0
    for name in {key.rsplit(".lora_", 1)[0] for key in first}:
        a1, b1, a2, b2 = (s[f"{name}.lora_{x}.weight"].double() for s in (first, second) for x in "AB")
        update = b2 @ a2 - b1 @ a1
        outside += float((mitigations.off_subspace(update, mitigations.update_basis(b1 @ a1)) ** 2).sum())
        total += float((update**2).sum())
    return outside / total


def test_a_strong_safety_anchor_holds_the_update_to_the_safety_directions(lora_config):
    free = chain(lora_config, "free", MitigationSpec("safety_anchor", 0.0))
    held = chain(lora_config, "held", MitigationSpec("safety_anchor", 1e4))
    assert free["stages"][1]["mitigation"]["mean_penalty"] == 0.0
    assert held["stages"][1]["mitigation"]["mean_penalty"] > 0.0
    out = Path(lora_config.out)
    assert off_subspace_share(out / "held") < 0.5 * off_subspace_share(out / "free")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(model="full", mitigation=("safety_anchor", 1.0)), "needs model.finetune: lora, not full"),
        (dict(order=["csqa", "csqa"], mitigation=("safety_anchor", 1.0)), "order ['csqa', 'csqa'] trains none"),
        (dict(order=["csqa", "bbq", "csqa"], mitigation=("safety_projection", 0.5)), "at stage 2; put it first"),
        (dict(order=["csqa", "bbq"], mitigation=("safety_anchor", 1.0)), "trains it last; add a stage after it"),
    ],
)
def test_safety_direction_mitigations_refuse_chains_without_a_direction(lora_config, changes, message):
    from chainforget.plan import plan_chain

    model = replace(lora_config.model, finetune=changes.get("model", "lora"))
    config = replace(
        lora_config,
        model=model,
        order=changes.get("order", lora_config.order),
        mitigation=MitigationSpec(*changes["mitigation"]),
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_chain(config)  # the stage plan, which preflight draws up before anything loads


def test_safety_direction_mitigations_act_only_after_the_safety_stage():
    from chainforget.plan import plan_stages

    for spec in (MitigationSpec("safety_anchor", 1.0), MitigationSpec("safety_projection", 0.5)):
        after = plan_stages(["bbq", "csqa", "csqa"], spec, CurvatureSpec(), 0)
        assert [plan.mitigation for plan in after] == [None, spec, spec]
        before = plan_stages(["csqa", "bbq"], spec, CurvatureSpec(), 0)
        assert [plan.mitigation for plan in before] == [None, None]


def test_group_replay_at_eta_zero_is_replay_stage_and_otherwise_weighs_groups(smoke_config):
    replayed = chain(smoke_config, "replay", MitigationSpec("replay_stage", 0.5))
    uniform = chain(smoke_config, "eta0", MitigationSpec("group_replay", 0.0, replay_share=0.5))
    assert [s["name"] for s in uniform["stages"]] == [s["name"] for s in replayed["stages"]]
    assert stage_rows(uniform, 3) == stage_rows(replayed, 3)
    weighted = chain(smoke_config, "eta1", MitigationSpec("group_replay", 1.0, replay_share=0.5))
    third = weighted["stages"][2]["mitigation"]
    assert third["group_kind"] == {"bbq": "category"} and third["replay_share"] == 0.5
    weights = third["group_weights"]
    assert set(weights) == {"bbq/Age", "bbq/Religion"}  # the smoke BBQ fixture's two categories
    assert sum(weights.values()) == pytest.approx(1.0) and max(weights.values()) > 0.5
    assert uniform["stages"][2]["mitigation"]["group_weights"] == {"bbq/Age": 0.5, "bbq/Religion": 0.5}


def test_group_replay_refuses_a_group_kind_a_replayed_task_lacks_and_replays_without_groups(smoke_config):
    from chainforget.plan import plan_chain

    with pytest.raises(ConfigError, match=re.escape("mitigation.group_kind: 'topic' is not a group kind of bbq")):
        plan_chain(replace(smoke_config, mitigation=MitigationSpec("group_replay", 1.0, group_kind="topic")))
    with pytest.raises(ConfigError, match=re.escape("replays (csqa) have no groups; use replay_stage")):
        plan_chain(replace(smoke_config, order=["csqa", "bbq"], mitigation=MitigationSpec("group_replay", 1.0)))
