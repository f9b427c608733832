"""The attention kernel and compiled decoder blocks a stage trains with belong to training alone: evaluation,
curvature and the next stage see the model as loaded, and compiling changes the numbers only within rounding."""

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

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


def test_frozen_weights_held_in_bf16_give_the_same_bits_under_autocast_and_fp32_for_the_hessian():
    import torch
    from test_curvature import tiny_batch

    from chainforget.models import frozen_in_fp32, frozen_linears, hold_frozen_in
    from lightning_modules.stage import answer_loss

    model = load_model(ModelSpec(name="tiny", finetune="lora"), seed=0)
    batch = tiny_batch()
    lora = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, batch)
        grads = torch.autograd.grad(loss, lora)
        return loss.detach(), grads

    loss, grads = loss_and_grads()
    fp32_weights = {m: m.weight.detach().clone() for m in frozen_linears(model)}
    embedding = model.get_input_embeddings().weight
    assert len(fp32_weights) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); the tied LM head is not among them
    freed = hold_frozen_in(model, torch.bfloat16)
    assert freed == sum(w.numel() * 2 for w in fp32_weights.values()) and embedding.dtype == torch.float32
    held_loss, held_grads = loss_and_grads()
    assert torch.equal(held_loss, loss) and all(torch.equal(a, b) for a, b in zip(held_grads, grads))
    with frozen_in_fp32(model):  # the Hessian's fp32 pass outside autocast: the rounded values, in fp32
        assert all(m.weight.dtype == torch.float32 for m in fp32_weights)
        assert all(torch.equal(m.weight, w.bfloat16().float()) for m, w in fp32_weights.items())
        answer_loss(model, batch).backward()
    assert all(m.weight.dtype == torch.bfloat16 for m in fp32_weights)


def test_a_bf16_mixed_chain_with_frozen_weights_in_bf16_still_measures_hessians_and_ewcs_fisher(smoke_config):
    from chainforget.config import MitigationSpec

    config = replace(
        smoke_config,
        model=replace(smoke_config.model, finetune="lora"),
        trainer=replace(smoke_config.trainer, precision="bf16-mixed"),
        curvature=CurvatureSpec(enabled=True, batches=1, max_iter=5, stages=[1, 2]),
        mitigation=MitigationSpec(name="ewc", strength=1.0),
    )
    # both run in fp32 outside autocast, after stage 1 left the frozen weights in bf16
    record = run(config, "bf16")
    assert all(stage["curvature"]["top_eigenvalue"] > 0 for stage in record["stages"])
    assert record["stages"][1]["mitigation"]["mean_penalty"] > 0


def test_example_losses_add_up_to_the_batch_loss_for_letter_and_text_answers():
    from lightning_modules.stage import example_losses, loss_of

    generator = torch.Generator().manual_seed(0)
    letters = {"answer": torch.tensor([3, 1, 4])}
    logits = torch.randn(3, 7, generator=generator)
    sums, counts = example_losses(logits, letters)
    assert counts.tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(sums, torch.nn.functional.cross_entropy(logits, letters["answer"], reduction="none"))
    text = {"targets": torch.tensor([[-100, 2, 5], [1, 1, 6], [-100, -100, 0]])}  # 2, 3 and 1 answer tokens
    logits = torch.randn(3, 3, 7, generator=generator)
    sums, counts = example_losses(logits, text)
    assert counts.tolist() == [2.0, 3.0, 1.0]
    row = torch.nn.functional.cross_entropy(logits[1], text["targets"][1], reduction="sum")
    assert torch.allclose(sums[1], row)
    assert torch.allclose(sums.sum() / counts.sum(), loss_of(logits, text))  # uniform weights: the usual loss


def test_gradient_checkpointing_gives_the_same_gradients_and_is_off_again_for_evaluation():
    from test_curvature import tiny_batch

    from lightning_modules.stage import answer_loss, checkpointed_blocks

    model = load_model(ModelSpec(name="tiny", finetune="lora"), seed=0)
    model.train()
    batch = tiny_batch()
    parameters = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # LoRA's B starts at 0: move it so every adapter has a gradient through the blocks
        for p in parameters:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    plain = torch.autograd.grad(answer_loss(model, batch), parameters)
    with checkpointed_blocks(model):
        assert model.is_activation_checkpointing
        checkpointed = torch.autograd.grad(answer_loss(model, batch), parameters)
    assert not model.is_activation_checkpointing
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, checkpointed))
    assert any(float(g.abs().sum()) > 0 for g in checkpointed)


def test_a_chain_trains_with_gradient_checkpointing_to_the_same_numbers(smoke_config):
    plain = run(smoke_config, "plain")
    # its own stage cache: gradient checkpointing is not part of the key, so the plain run's stages would be reused
    fresh = replace(smoke_config, cache_dir=str(Path(smoke_config.cache_dir).with_name("checkpointed-stages")))
    checkpointed = run(fresh, "checkpointed", gradient_checkpointing=True)
    assert not any(stage["cache_hit"] for stage in checkpointed["stages"])
    assert checkpointed["stages"][1]["train"]["final_loss"] == pytest.approx(plain["stages"][1]["train"]["final_loss"])
    assert [r["acc"] for r in checkpointed["eval"]] == pytest.approx([r["acc"] for r in plain["eval"]])
