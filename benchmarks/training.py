"""Training throughput: StageModule under Trainer.fit vs a minimal PyTorch loop, side by side, against the
machine's measured matmul peak.

    python benchmarks/training.py [--steps 12] [--repeats 3] [--threads 2] [--batch-sizes 8 32] [--variants ...]
                                  [--profile]

Both sides: SmolLM2-135M-Instruct (the offline route), LoRA r=8 on q/k/v/o, BBQ-lite prompts, max_seq_len 256, bf16
autocast with the frozen weights held in bf16, fused AdamW, eager attention (what ``train.attention: auto`` picks on
a CPU), the same batches in the same order. Beside them: Trainer.fit with the SDPA kernel (the model's own) and with
compiled decoder blocks (``train.compile``), and at each batch size. Tokens/s counts real (non-pad) tokens; the
first two steps of every run are warm-up (and compilation) and not timed. Model FLOPs per token for LoRA training
are 4 x (non-embedding parameters): 2N forward + 2N for the activation gradients (frozen weights get no weight
gradients), the LM head only at the answer position; plus attention's own products (``flops_per_token``). Where the
run is on tcmalloc (as the chainforget command is, when installed), Trainer.fit is measured again in a child process
on the system's malloc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from table import Row, print_table

from chainforget import allocator

PEAK_SHAPES = [(n, n, n) for n in (1024, 2048, 4096)] + [
    (4096, k, n) for k in (256, 512, 1024) for n in (512, 1024, 2048)
]


def matmul_peak(dtype: torch.dtype, repeats: int = 8) -> float:
    """The machine's attainable matmul FLOP/s for this dtype: the best of repeated ``torch.mm`` over square
    and transformer-like shapes, each writing into a preallocated output (a fresh output is paged in by
    the kernel on every call and measured the allocator, not the matmul: 1.4-2.8 TFLOP/s across runs)."""
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b, out = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.empty(m, n, dtype=dtype)
        torch.mm(a, b, out=out)
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


def batches(steps: int, batch_size: int):
    from chainforget.config import ModelSpec, TaskSpec
    from chainforget.models import load_tokenizer
    from chainforget.tasks import load
    from lightning_modules.stage import StageDataModule

    tokenizer = load_tokenizer(ModelSpec())
    data = {"bbq": load("bbq", TaskSpec(max_train=2000, max_eval=50), seed=0)}
    datamodule = StageDataModule.prepared(
        data, tokenizer, mixture="bbq", batch_size=batch_size, steps=steps, max_seq_len=256, seed=0
    )
    datamodule.setup()
    return datamodule, list(datamodule.train_dataloader())


def plain_loop(model, loader_batches) -> list[tuple[float, int]]:
    """(seconds, real tokens) per step of the straightforward loop."""
    import torch.nn.functional as F

    from chainforget.models import hold_frozen_in

    # what a bf16-mixed stage does: the same numeric settings on both sides
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    hold_frozen_in(model, torch.bfloat16)
    model.set_attn_implementation("eager")
    model.train()
    timings = []
    for batch in loader_batches:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                logits_to_keep=1,
                use_cache=False,
            )
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
    trainer = L.Trainer(
        max_steps=datamodule.steps,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule)
    return timer.timings


def profile(args) -> None:
    """Where a step's time goes: ``torch.profiler`` over the plain loop's steps after two warm-up steps (the same
    numerics as a stage), the operators by their own time, at the first batch size; then the matrix products by
    kind, as they ran in the steps and replayed alone (``replay_products``), and the MFU the products alone would
    allow: the ceiling on a step's MFU if everything else in it took no time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    from chainforget.config import ModelSpec
    from chainforget.models import load_model

    batch_size, spec = args.batch_sizes[0], ModelSpec()
    _, loader = batches(args.steps, batch_size)
    model = load_model(spec, seed=0)
    plain_loop(model, loader[:2])
    with profiler(activities=[ProfilerActivity.CPU], record_shapes=True) as trace:
        timings = plain_loop(model, loader[2:5])
    rate = sum(t for _, t in timings) / sum(s for s, _ in timings)
    events = [e for e in trace.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profile: plain loop, batch {batch_size}, 3 steps at {rate:.0f} tokens/s; operators by own time")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        share = 100 * event.self_cpu_time_total / total
        print(f"  {event.key:<40} {share:5.1f}%  {event.count:>6} calls")

    def kind(event) -> str:
        if event.key == "aten::bmm":
            return "attention (bmm)"
        left, right = event.input_shapes[:2]
        if model.config.vocab_size in (*left, *right):  # first: its rows, one a sequence, may number the rank
            return "LM head"
        return f"LoRA rank {spec.lora.rank}" if spec.lora.rank in (*left, *right) else "model weights"

    products = [e for e in trace.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::bmm")]
    peak = matmul_peak(torch.bfloat16)
    rows = statistics.mean(int(b["attention_mask"].sum()) for b in loader[2:5])
    print(
        f"matrix products (bf16 peak {peak / 1e12:.2f} TFLOP/s, {rows:.0f} token rows a step): in the steps / "
        "replayed alone at their shapes"
    )
    by_kind: dict[str, list] = {}
    for event in products:
        by_kind.setdefault(kind(event), []).append(event)
    in_steps = replayed = 0.0
    for name, chosen in sorted(by_kind.items()):
        seconds, flops = replay_products(chosen)
        measured = sum(e.self_cpu_time_total for e in chosen) / 1e6
        in_steps, replayed = in_steps + measured, replayed + seconds
        print(
            f"  {name:<18} {sum(e.count for e in chosen):>5} calls {flops / 1e9:6.1f} GFLOP: {measured:.2f} s, "
            f"{flops / measured / 1e12:.2f} TFLOP/s / {seconds:.2f} s, {flops / seconds / 1e12:.2f} TFLOP/s"
        )
    model_flops = flops_per_token(model.config, non_embedding_parameters(model), loader[2:5]) * sum(
        tokens for _, tokens in timings
    )
    print(
        f"  the MFU if nothing but the products took time: {100 * model_flops / in_steps / peak:.0f}% as they ran "
        f"in the steps, {100 * model_flops / replayed / peak:.0f}% as fast as alone"
    )


def replay_products(products) -> tuple[float, float]:
    """Seconds and FLOPs of profiled matrix products run again alone, each ``count`` times at its recorded shapes, in
    bf16 (autocast's dtype for them), into a preallocated output: what the products cost by themselves, operands
    warm in cache, so a lower bound on their time in a step."""
    seconds = flops = 0.0
    for event in products:
        left, right = event.input_shapes[:2]
        a, b = torch.randn(left, dtype=torch.bfloat16), torch.randn(right, dtype=torch.bfloat16)
        product = torch.bmm if event.key == "aten::bmm" else torch.mm
        out = product(a, b)
        started = time.perf_counter()
        for _ in range(event.count):
            product(a, b, out=out)
        seconds += time.perf_counter() - started
        flops += 2 * out.numel() * left[-1] * event.count
    return seconds, flops


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


def flops_per_token(config, non_embedding: int, loader_batches) -> float:
    """Model FLOPs per real token of these batches: 4 x non-embedding parameters, plus the attention
    products (QK^T and AV: 4 x layers x width x sequence length forward, twice that backward, over each
    sequence's real length, as PaLM's MFU counts them)."""
    lengths = torch.cat([b["attention_mask"].sum(dim=1) for b in loader_batches]).double()
    width = config.num_attention_heads * config.head_dim
    attention = 12 * config.num_hidden_layers * width * float((lengths**2).sum() / lengths.sum())
    return 4 * non_embedding + attention


def tokens_per_second(timings: list[tuple[float, int]]) -> float:
    timed = timings[2:]
    return sum(tokens for _, tokens in timed) / sum(seconds for seconds, _ in timed)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="print where a step's time goes, then measure")
    parser.add_argument(
        "--json", action="store_true", help="print only the median tokens/s, as JSON (for a parent run)"
    )
    return parser


VARIANTS = {
    "plain": ("plain loop (eager attention)", lambda model, dm, loader: plain_loop(model, loader)),
    "fit": ("StageModule + Trainer.fit", lambda model, dm, loader: lightning_fit(model, dm)),
    "sdpa": ("  the same, SDPA attention", lambda model, dm, loader: lightning_fit(model, dm, attention="sdpa")),
    "compiled": ("  the same, compiled blocks", lambda model, dm, loader: lightning_fit(model, dm, compile=True)),
}


def training_rates(args, peak: float, quiet: bool = False) -> tuple[dict, dict, dict]:
    """Median tokens/s per ``(batch size, variant)`` (the plain loop at the first batch size only), and per
    batch size the padding share and the model FLOPs per token of the timed steps."""
    from chainforget.config import ModelSpec
    from chainforget.models import load_model

    model = load_model(ModelSpec())
    non_embedding = non_embedding_parameters(model)
    say = (lambda *a, **k: None) if quiet else print
    say(f"{'batch':>5} {'side':<30} {'tokens/s':>9} {'spread':>14} {'MFU':>6}")
    medians, padding, flops = {}, {}, {}
    for batch_size in args.batch_sizes:
        datamodule, loader = batches(args.steps, batch_size)
        flops[batch_size] = flops_per_token(model.config, non_embedding, loader[2:])
        real = sum(int(b["attention_mask"].sum()) for b in loader)
        padded = sum(b["attention_mask"].numel() for b in loader)
        padding[batch_size] = (padded - real) / padded
        for variant in args.variants:
            if batch_size != args.batch_sizes[0] and variant == "plain":
                continue
            name, run = VARIANTS[variant]
            rates = [
                tokens_per_second(run(load_model(ModelSpec(), seed=0), datamodule, loader)) for _ in range(args.repeats)
            ]
            medians[batch_size, variant] = rate = statistics.median(rates)
            mfu = rate * flops[batch_size] / peak
            say(
                f"{batch_size:>5} {name:<30} {rate:>9.0f} [{min(rates):>5.0f}, {max(rates):>5.0f}] {100 * mfu:>5.1f}%",
                flush=True,
            )
        say(
            f"{batch_size:>5} padding {100 * padding[batch_size]:.1f}% of tokens processed; "
            f"{flops[batch_size] / 1e6:.0f} MFLOP per token"
        )
    return medians, padding, flops


def on_system_malloc(args) -> tuple[str, dict]:
    """The Trainer.fit measurements again in a child process on glibc's malloc: (its allocator, medians)."""
    variants = [v for v in ("fit", "compiled") if v in args.variants]
    command = [
        sys.executable,
        __file__,
        "--json",
        "--variants",
        *variants,
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--batch-sizes",
        *map(str, args.batch_sizes),
    ]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {allocator.OPT_OUT: "system"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the system-malloc run failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    return result["allocator"], {(int(b), v): rate for b, v, rate in result["medians"]}


def measure(args) -> list[Row]:
    torch.set_num_threads(args.threads)
    if args.json:
        medians, _, _ = training_rates(args, peak=1.0, quiet=True)
        print(
            json.dumps({"allocator": allocator.in_use(), "medians": [[b, v, rate] for (b, v), rate in medians.items()]})
        )
        return []
    if args.profile:
        profile(args)
    peaks_bf16, peak_fp32 = [matmul_peak(torch.bfloat16)], matmul_peak(torch.float32)
    print(
        f"training on {allocator.in_use()} malloc: threads {args.threads}, {args.steps} steps (first 2 untimed), "
        f"{args.repeats} repeats, median [min, max]; MFU against the bf16 peak measured before training"
    )
    print(f"matmul peak before training: bf16 {peaks_bf16[0] / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f} TFLOP/s")
    medians, padding, flops = training_rates(args, peaks_bf16[0])
    peaks_bf16.append(matmul_peak(torch.bfloat16))
    peak = max(peaks_bf16)
    print(
        f"matmul peak after training: bf16 {peaks_bf16[1] / 1e12:.2f} TFLOP/s; "
        f"the rows use the higher, {peak / 1e12:.2f}"
    )
    rows = []
    first = args.batch_sizes[0]
    if {"plain", "fit"} <= set(args.variants):
        ours, theirs = medians[first, "fit"], medians[first, "plain"]
        rows.append(
            Row(
                f"training tokens/s, Trainer.fit vs plain loop, batch {first}",
                f"{ours:.0f}",
                f"{theirs:.0f}",
                ours / theirs,
                ">= 0.95",
                ours / theirs >= 0.95,
            )
        )
    for batch_size in args.batch_sizes:
        for variant, label in (("fit", "default"), ("compiled", "train.compile")):
            if (batch_size, variant) in medians:
                mfu = medians[batch_size, variant] * flops[batch_size] / peak
                rows.append(
                    Row(
                        f"training MFU of {peak / 1e12:.2f} TFLOP/s, {label}, batch {batch_size}",
                        f"{100 * mfu:.1f}%",
                        "",
                        None,
                        ">= 30%",
                        mfu >= 0.30,
                    )
                )
        rows.append(
            Row(
                f"padding share of training tokens, batch {batch_size}",
                f"{100 * padding[batch_size]:.1f}%",
                "",
                None,
                "< 10%",
                padding[batch_size] < 0.10,
            )
        )
    if allocator.in_use() == "tcmalloc" and {"fit", "compiled"} & set(args.variants):
        theirs_allocator, system = on_system_malloc(args)
        for (batch_size, variant), rate in system.items():
            label = VARIANTS[variant][0].strip().removeprefix("the same, ")
            print(f"{batch_size:>5} {label:<30} {rate:>9.0f} on {theirs_allocator} malloc")
            ours = medians[batch_size, variant]
            rows.append(
                Row(
                    f"training tokens/s, tcmalloc vs {theirs_allocator} malloc, {label}, batch {batch_size}",
                    f"{ours:.0f}",
                    f"{rate:.0f}",
                    ours / rate,
                )
            )
    return rows


def main() -> int:
    allocator.reexec_on_tcmalloc()
    if rows := measure(parser().parse_args()):
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
