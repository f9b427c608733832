"""Training throughput: StageModule under Trainer.fit vs a minimal PyTorch loop, side by side, against the
machine's measured matmul peak.

    python benchmarks/training.py [--steps 12] [--repeats 3] [--threads 2] [--batch-sizes 8 32]

Both sides: SmolLM2-135M-Instruct (the offline route), LoRA r=8 on q/k/v/o, BBQ-lite prompts, max_seq_len 256,
bf16 autocast, AdamW, eager attention (what ``train.attention: auto`` picks on a CPU), the same batches in
the same order. Beside them: Trainer.fit with the SDPA kernel (the model's own) and with compiled decoder
blocks (``train.compile``), and at each batch size. Tokens/s counts real (non-pad) tokens; the first two
steps of every run are warm-up (and compilation) and not timed. Model FLOPs per token for LoRA training are
taken as 4 x (non-embedding parameters): 2N forward + 2N for the activation gradients (frozen weights get no
weight gradients), the LM head only at the answer position.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from table import Row, print_table


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 10) -> float:
    """The best FLOP/s of repeated square matmuls: the machine's attainable peak for this dtype."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / min(times)


def batches(steps: int, batch_size: int):
    from chainforget.config import ModelSpec, TaskSpec
    from chainforget.models import load_tokenizer
    from chainforget.tasks import load
    from lightning_modules.stage import StageDataModule

    tokenizer = load_tokenizer(ModelSpec())
    data = {"bbq": load("bbq", TaskSpec(max_train=2000, max_eval=50), seed=0)}
    datamodule = StageDataModule.prepared(data, tokenizer, stage="bbq", batch_size=batch_size, steps=steps, max_seq_len=256, seed=0)
    datamodule.setup()
    return datamodule, list(datamodule.train_dataloader())


def plain_loop(model, loader_batches) -> list[tuple[float, int]]:
    """(seconds, real tokens) per step of the straightforward loop."""
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.set_attn_implementation("eager")
    model.train()
    timings = []
    for batch in loader_batches:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)  # fmt: skip
        loss = F.cross_entropy(out.logits[:, -1].float(), batch["answer"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append((time.perf_counter() - started, int(batch["attention_mask"].sum())))
    return timings


def lightning_fit(model, datamodule, **kernels) -> list[tuple[float, int]]:
    import lightning as L

    from lightning_modules.stage import StageModule

    class Timer(L.Callback):
        def __init__(self):
            self.timings, self.started = [], 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.timings.append((time.perf_counter() - self.started, int(batch["attention_mask"].sum())))

    timer = Timer()
    module = StageModule.wrapping(model, lr=1e-3, warmup_ratio=0.0, weight_decay=0.0, **kernels)
    trainer = L.Trainer(max_steps=datamodule.steps, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])  # fmt: skip
    trainer.fit(module, datamodule)
    return timer.timings


def tokens_per_second(timings: list[tuple[float, int]]) -> float:
    timed = timings[2:]
    return sum(tokens for _, tokens in timed) / sum(seconds for seconds, _ in timed)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    return parser


def measure(args) -> list[Row]:
    torch.set_num_threads(args.threads)
    from chainforget.config import ModelSpec
    from chainforget.models import load_model

    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    non_embedding = sum(p.numel() for n, p in load_model(ModelSpec()).named_parameters() if "embed" not in n)
    variants = {
        "plain loop (eager attention)": lambda model, dm, loader: plain_loop(model, loader),
        "StageModule + Trainer.fit": lambda model, dm, loader: lightning_fit(model, dm),
        "  the same, SDPA attention": lambda model, dm, loader: lightning_fit(model, dm, attention="sdpa"),
        "  the same, compiled blocks": lambda model, dm, loader: lightning_fit(model, dm, compile=True),
    }
    print(f"training: threads {args.threads}, {args.steps} steps (first 2 untimed), {args.repeats} repeats, median [min, max]")
    print(f"matmul peak: bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f} TFLOP/s")
    print(f"{'batch':>5} {'side':<30} {'tokens/s':>9} {'spread':>14} {'MFU':>6}")
    medians, padding = {}, {}
    for batch_size in args.batch_sizes:
        datamodule, loader = batches(args.steps, batch_size)
        real = sum(int(b["attention_mask"].sum()) for b in loader)
        padded = sum(b["attention_mask"].numel() for b in loader)
        padding[batch_size] = (padded - real) / padded
        for name, run in variants.items():
            if batch_size != args.batch_sizes[0] and "plain" in name:
                continue
            rates = [tokens_per_second(run(load_model(ModelSpec(), seed=0), datamodule, loader)) for _ in range(args.repeats)]
            medians[batch_size, name] = rate = statistics.median(rates)
            mfu = rate * 4 * non_embedding / peak_bf16
            print(f"{batch_size:>5} {name:<30} {rate:>9.0f} [{min(rates):>5.0f}, {max(rates):>5.0f}] {100 * mfu:>5.1f}%", flush=True)
        print(f"{batch_size:>5} padding {100 * padding[batch_size]:.1f}% of tokens processed")
    first = args.batch_sizes[0]
    ours, theirs = medians[first, "StageModule + Trainer.fit"], medians[first, "plain loop (eager attention)"]
    rows = [Row(f"training tokens/s, Trainer.fit vs plain loop, batch {first}", f"{ours:.0f}", f"{theirs:.0f}", ours / theirs, ">= 0.95", ours / theirs >= 0.95)]
    for batch_size in args.batch_sizes:
        for name, label in (("StageModule + Trainer.fit", "default"), ("  the same, compiled blocks", "train.compile")):
            mfu = medians[batch_size, name] * 4 * non_embedding / peak_bf16
            rows.append(Row(f"training MFU of {peak_bf16 / 1e12:.2f} TFLOP/s, {label}, batch {batch_size}", f"{100 * mfu:.1f}%", "", None, ">= 30%", mfu >= 0.30))
        rows.append(Row(f"padding share of training tokens, batch {batch_size}", f"{100 * padding[batch_size]:.1f}%", "", None, "< 10%", padding[batch_size] < 0.10))
    return rows


def main() -> int:
    print_table(measure(parser().parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
