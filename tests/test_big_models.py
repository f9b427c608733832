"""The 7B presets, checked as far as a CPU allows: they parse, the model they describe wraps as planned (built from
Llama-2-7B's config on the meta device, which holds no weights), and what needs a GPU says so before anything runs."""

from dataclasses import replace

import pytest
import torch

from chainforget.cli import main
from chainforget.config import ModelSpec, parse_chain
from chainforget.errors import ConfigError
from chainforget.models import trainable_parameters, wrap

QLORA = ["--config", "sweeps/configs/paper.yaml", "--config", "sweeps/configs/llama2_7b/qlora.yaml"]


def llama2_7b_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # Llama-2-7B's published config.json
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_the_qlora_preset_wraps_llama2_7b_with_the_adapters_it_documents():
    from lightning_modules.stage import checkpointed_blocks

    config = parse_chain(QLORA, "test")
    assert (config.model.quantization, config.model.finetune) == ("nf4", "lora")
    assert config.train.gradient_checkpointing and config.trainer.precision == "bf16-mixed"
    model = llama2_7b_on_meta()
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # Llama-2-7B
    model = wrap(model, config.model)
    # r16 on q/k/v/o (4 x 16 x (4096 + 4096)) and gate/up (2 x 16 x (4096 + 11008)) and down (16 x (11008 + 4096)),
    # in each of 32 blocks
    per_block = 4 * 16 * (4096 + 4096) + 2 * 16 * (4096 + 11008) + 16 * (11008 + 4096)
    assert sum(p.numel() for p in trainable_parameters(model).values()) == 32 * per_block == 39_976_960
    with checkpointed_blocks(model):
        assert model.is_activation_checkpointing


def test_qlora_on_a_machine_without_a_gpu_is_one_clear_line_before_anything_runs(tmp_path, capsys):
    code = main(["chain", *QLORA, f"--out={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'stages'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "model.quantization: nf4 (QLoRA) needs a CUDA GPU" in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "stages").exists()


def test_a_quantised_base_needs_lora():
    with pytest.raises(ConfigError, match="model.quantization: nf4 keeps the base weights frozen in 4 bits"):
        ModelSpec(quantization="nf4", finetune="full")
    assert replace(ModelSpec(), quantization="nf4").finetune == "lora"


FSDP = ["--config", "sweeps/configs/paper.yaml", "--config", "sweeps/configs/llama2_7b/fsdp.yaml"]


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.device_mesh.init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_the_fsdp_preset_shards_llama2_7b_block_by_block(one_process_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lightning_modules.stage import checkpointed_blocks, shard_blocks

    config = parse_chain(FSDP, "test")
    assert (config.model.finetune, config.model.quantization) == ("full", "none")
    assert (config.trainer.strategy, config.trainer.devices, config.train.batch_size) == ("fsdp", 8, 16)
    assert config.train.gradient_checkpointing and config.trainer.precision == "bf16-mixed"
    model = wrap(llama2_7b_on_meta(), config.model)
    shard_blocks(model, one_process_group)
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    assert units == ["", *(f"model.layers.{i}" for i in range(32))]  # the whole model, then each decoder block
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert sum(p.numel() for p in trainable_parameters(model).values()) == 6_738_415_616  # every weight trains
    shard_blocks(model, one_process_group)  # a resumed fit finds it sharded: nothing changes
    assert [name for name, module in model.named_modules() if isinstance(module, FSDPModule)] == units
    with checkpointed_blocks(model):
        assert model.is_activation_checkpointing


def test_the_fsdp_preset_on_a_machine_without_gpus_is_one_clear_line_before_anything_runs(tmp_path, capsys):
    code = main(["chain", *FSDP, f"--out={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'stages'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("chainforget chain: error: trainer: ")
    assert err[0].endswith("No supported gpu backend found!")  # Lightning's own word for accelerator: gpu
    assert not (tmp_path / "runs").exists() and not (tmp_path / "stages").exists()
