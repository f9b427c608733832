"""The attention kernel and compiled decoder blocks a stage trains with belong to training alone: evaluation,
curvature and the next stage see the model as loaded, and compiling changes the numbers only within rounding."""

from dataclasses import replace

import pandas as pd
import pytest

from chainforget import evaluation
from chainforget.config import CurvatureSpec, ModelSpec
from chainforget.errors import ConfigError
from chainforget.models import load_model
from lightning_modules.chain import run_chain
from lightning_modules.stage import StageModule, compiled_blocks


def run(config, name, **train):
    config = replace(
        config,
        run_name=name,
        train=replace(config.train, steps=6, **train),
        wandb=replace(config.wandb, mode="disabled"),
    )
    return run_chain(config, progress=False)


def kernels_seen(monkeypatch) -> dict[str, set]:
    seen = {"train": set(), "eval": set(), "compiled blocks": set()}
    original_step, original_scores = StageModule.training_step, evaluation.score_letters

    def training_step(self, batch, batch_idx):
        seen["train"].add(self.network.config._attn_implementation)
        seen["compiled blocks"].add(sum("forward" in vars(m) for m in self.network.modules()))
        return original_step(self, batch, batch_idx)

    def score_letters(model, *args, **kwargs):
        seen["eval"].add(model.config._attn_implementation)
        seen["compiled blocks"].add(sum("forward" in vars(m) for m in model.modules()))
        return original_scores(model, *args, **kwargs)

    monkeypatch.setattr(StageModule, "training_step", training_step)
    monkeypatch.setattr(evaluation, "score_letters", score_letters)
    return seen


def test_auto_attention_trains_eager_on_cpu_and_evaluates_with_the_models_own_kernel(smoke_config, monkeypatch):
    seen = kernels_seen(monkeypatch)
    run(smoke_config, "auto")
    assert seen == {"train": {"eager"}, "eval": {"sdpa"}, "compiled blocks": {0}}


def test_compiled_blocks_train_to_the_same_weights_within_rounding_and_are_undone_after(smoke_config, monkeypatch):
    config = replace(smoke_config, curvature=CurvatureSpec(enabled=True, batches=1, max_iter=5, stages=[1]))
    plain = run(config, "plain", attention="sdpa")
    seen = kernels_seen(monkeypatch)
    compiled = run(config, "compiled", attention="sdpa", compile=True)
    # the tiny model has 2 decoder layers: compiled while training, plain for every evaluation
    assert seen == {"train": {"sdpa"}, "eval": {"sdpa"}, "compiled blocks": {0, 2}}
    for ours, theirs in zip(compiled["stages"], plain["stages"]):
        assert ours["cache_key"] != theirs["cache_key"]  # compiled stages are cached apart
        assert ours["train"]["final_loss"] == pytest.approx(theirs["train"]["final_loss"], rel=1e-3)
    # curvature runs uncompiled (compiled graphs have no double backward)
    assert compiled["stages"][0]["curvature"]["top_eigenvalue"] == pytest.approx(
        plain["stages"][0]["curvature"]["top_eigenvalue"], rel=1e-3
    )
    runs = smoke_config.out
    ours, theirs = (pd.read_parquet(f"{runs}/{name}/predictions.parquet") for name in ("compiled", "plain"))
    assert (ours["pred"] == theirs["pred"]).mean() >= 0.95


def test_compiling_a_model_without_repeated_blocks_is_a_config_error_that_leaves_it_untouched():
    model = load_model(ModelSpec(name="tiny", finetune="full"), seed=0)
    model._no_split_modules = []
    with pytest.raises(
        ConfigError, match=r"^train.compile \(fit: model.compile\): LlamaForCausalLM lists no repeated blocks"
    ):
        with compiled_blocks(model):
            pass
    assert not any("forward" in vars(m) for m in model.modules())
