"""Evaluation throughput: chainforget's scoring vs lm-evaluation-harness on the same model, items and rule.

    pip install -e ".[bench]"
    python benchmarks/evaluation.py [--bbq 200] [--arc 100] [--repeats 3] [--threads 2]

Model: SmolLM2-135M-Instruct (the converted local directory). Items: BBQ and ARC-Challenge test questions
from the release files in ../shared/data when present (else BBQ-lite from the bigbench sdist; ARC skipped).
Rule: each option's text scored as a continuation of ``<question>\\nAnswer:`` by summed log-probability (lm-eval's
``acc``), through ``HFLM.loglikelihood`` with the same context/continuation strings. Both sides fp32 for the
agreement check and the ratio; chainforget's bf16 autocast and letter mode are reported beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from table import Row, print_table

from chainforget import allocator

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def items(bbq: int, arc: int):
    from chainforget.config import TaskSpec
    from chainforget.tasks import load

    sets = {}
    if bbq:
        bbq_spec = (
            TaskSpec(source="release", path=str(SHARED / "bbq"), max_eval=bbq)
            if (SHARED / "bbq").exists()
            else TaskSpec(max_eval=bbq)
        )
        sets["bbq"] = load("bbq", bbq_spec, seed=0).eval
    if arc and (SHARED / "arc").exists():
        sets["arc_challenge"] = load(
            "arc_challenge", TaskSpec(source="release", path=str(SHARED / "arc"), max_eval=arc), seed=0
        ).eval
    return sets


def lm_eval_scores(lm, examples) -> tuple[np.ndarray, list[list[float]]]:
    from lm_eval.api.instance import Instance

    from chainforget.tasks import question_text

    requests, owners = [], []
    for i, example in enumerate(examples):
        for j, choice in enumerate(example.choices):
            context = question_text(example) + "\nAnswer:"
            requests.append(Instance(request_type="loglikelihood", doc={}, arguments=(context, f" {choice}"), idx=j))
            owners.append(i)
    results = lm.loglikelihood(requests, disable_tqdm=True)
    totals = [[] for _ in examples]
    for owner, (logprob, _) in zip(owners, results):
        totals[owner].append(float(logprob))
    return np.array([int(np.argmax(row)) for row in totals]), totals


def timed(function, repeats: int):
    results, seconds = None, []
    for _ in range(repeats):
        started = time.perf_counter()
        results = function()
        seconds.append(time.perf_counter() - started)
    return results, seconds


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bbq", type=int, default=200)
    parser.add_argument("--arc", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def measure(args) -> list[Row]:
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM
    from training import matmul_peak, non_embedding_parameters

    from chainforget.config import ModelSpec
    from chainforget.models import SMOLLM2, load_model, load_tokenizer, wheel_model_dir
    from chainforget.scoring import score_letters, score_text
    from chainforget.tasks import question_text

    peak = matmul_peak(torch.bfloat16)
    spec = ModelSpec(finetune="full")
    model, tokenizer = load_model(spec).eval(), load_tokenizer(spec)
    non_embedding = non_embedding_parameters(model)
    lm = HFLM(pretrained=str(wheel_model_dir(SMOLLM2)), device="cpu", dtype="float32", batch_size=args.batch_size)
    print(
        f"evaluation: threads {args.threads}, batch {args.batch_size}, {args.repeats} repeats; "
        "items/s median [min, max]"
    )
    print(f"{'task':<14} {'side':<34} {'items/s':>8} {'spread':>16}")
    rows = []
    for task, examples in items(args.bbq, args.arc).items():
        n = len(examples)
        (theirs, their_lp), their_s = timed(lambda: lm_eval_scores(lm, examples), args.repeats)
        ours, our_s = timed(lambda: score_text(model, tokenizer, examples, batch_size=args.batch_size), args.repeats)
        _, bf16_s = timed(
            lambda: score_text(model, tokenizer, examples, batch_size=args.batch_size, precision="bf16-mixed"),
            args.repeats,
        )
        _, letter_s = timed(
            lambda: score_letters(
                model, tokenizer, examples, batch_size=args.batch_size, precision="bf16-mixed", progress=False
            ),
            args.repeats,
        )
        rates = {}
        for side, seconds in (
            ("lm-eval HFLM loglikelihood (fp32)", their_s),
            ("chainforget text (fp32)", our_s),
            ("chainforget text (bf16 autocast)", bf16_s),
            ("chainforget letter (bf16 autocast)", letter_s),
        ):
            values = [n / s for s in seconds]
            rates[side] = statistics.median(values)
            print(f"{task:<14} {side:<34} {rates[side]:>8.1f} [{min(values):>6.1f}, {max(values):>6.1f}]")
        agree = float(np.mean(ours.pred == theirs))
        worst = max(abs(a - b) for row_a, row_b in zip(ours.option_logprobs, their_lp) for a, b in zip(row_a, row_b))
        ours_rate, theirs_rate = rates["chainforget text (fp32)"], rates["lm-eval HFLM loglikelihood (fp32)"]
        tokens = sum(
            len(tokenizer.encode(question_text(e) + "\nAnswer:"))
            + sum(len(tokenizer.encode(f" {c}")) for c in e.choices)
            for e in examples
        )
        mfu = 2 * non_embedding * tokens / statistics.median(bf16_s) / peak
        print(
            f"{task:<14} agreement {100 * agree:.2f}% ({int(round((1 - agree) * n))} of {n} differ), "
            f"max |dlogprob| {worst:.2e}"
        )
        rows += [
            Row(
                f"{task} text fp32 items/s vs lm-eval",
                f"{ours_rate:.1f}",
                f"{theirs_rate:.1f}",
                ours_rate / theirs_rate,
                ">= 2",
                ours_rate / theirs_rate >= 2,
            ),
            Row(f"{task} agreement with lm-eval", f"{100 * agree:.2f}%", "", None, ">= 99.5%", agree >= 0.995),
            Row(f"{task} letter bf16 items/s", f"{rates['chainforget letter (bf16 autocast)']:.1f}"),
            Row(f"{task} eval MFU, text bf16, of {peak / 1e12:.2f} TFLOP/s", f"{100 * mfu:.1f}%"),
        ]
    return rows


def main() -> int:
    allocator.reexec_on_tcmalloc()  # as the chainforget command does
    print_table(measure(parser().parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
