from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chainforget.config import ModelSpec
from chainforget.errors import ConfigError
from chainforget.models import load_model, tiny_tokenizer
from chainforget.scoring import encode_prompt, left_pad, letter_token_ids, score_letters
from chainforget.tasks import Example, multiple_choice_prompt

ROWS = 97


class TableLM(torch.nn.Module):
    """Next-token logits looked up from a fixed table by the sum of the real (unmasked) input ids."""

    def __init__(self, vocab: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(ROWS, vocab, generator=generator))

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        keys = (input_ids * attention_mask).sum(-1) % ROWS
        return SimpleNamespace(logits=self.table[keys].unsqueeze(1))


def examples(count: int) -> list[Example]:
    out = []
    for i in range(count):
        choices = ("red", "green", "blue") if i % 2 else ("one", "two", "three", "four", "five")
        question = "Which word? " + "x " * (i % 7)  # different lengths, so batches need padding
        out.append(Example(id=str(i), prompt=multiple_choice_prompt(question, choices), choices=choices, label=0))
    return out


def test_prediction_is_the_argmax_over_the_options_letters_only():
    tokenizer = tiny_tokenizer()
    model = TableLM(len(tokenizer))
    letters = letter_token_ids(tokenizer, 5)
    items = examples(12)
    scores = score_letters(model, tokenizer, items, batch_size=5, progress=False)
    for i, example in enumerate(items):
        key = sum(encode_prompt(tokenizer, example.prompt, 384)) % ROWS
        row = model.table[key].log_softmax(-1).detach()
        expected = row[letters[: len(example.choices)]]
        assert scores.pred[i] == int(expected.argmax())
        assert scores.option_logprobs[i] == pytest.approx(expected.tolist(), abs=1e-5)
        assert len(scores.option_logprobs[i]) == len(example.choices)


def test_batched_scoring_equals_one_question_at_a_time_on_a_real_tiny_llama():
    tokenizer = tiny_tokenizer()
    model = load_model(ModelSpec(name="tiny", finetune="full"), seed=1)
    items = examples(9)
    batched = score_letters(model, tokenizer, items, batch_size=4, progress=False)
    single = score_letters(model, tokenizer, items, batch_size=1, progress=False)
    np.testing.assert_array_equal(batched.pred, single.pred)
    for a, b in zip(batched.option_logprobs, single.option_logprobs):
        assert a == pytest.approx(b, abs=1e-4)


def test_left_pad_puts_every_last_token_at_the_end_with_real_positions():
    batch = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_long_prompts_keep_their_end():
    tokenizer = tiny_tokenizer()
    ids = encode_prompt(tokenizer, "word " * 300 + "Answer:", max_seq_len=16)
    assert len(ids) == 16
    assert tokenizer.decode(ids).endswith("Answer:")


def test_letters_must_be_single_tokens():
    class SplittingTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ConfigError, match="letter mode needs one token"):
        letter_token_ids(SplittingTokenizer(), 2)


def reference_text_scores(model, tokenizer, items):
    """The straightforward path: every (question, option) alone, full logits, no padding, no truncation."""
    from chainforget.scoring import encode_pair
    from chainforget.tasks import question_text

    totals = []
    for example in items:
        row = []
        for choice in example.choices:
            head, tail = encode_pair(tokenizer, question_text(example) + "\nAnswer:", f" {choice}")
            ids = torch.tensor([head + tail])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            row.append(float(sum(logprobs[len(head) - 1 + k, token] for k, token in enumerate(tail))))
        totals.append(row)
    return totals


def test_text_mode_fast_path_matches_the_straightforward_path():
    from chainforget.scoring import score_text

    tokenizer = tiny_tokenizer()
    model = load_model(ModelSpec(name="tiny", finetune="full"), seed=2)
    items = [
        Example(
            id=str(i), prompt=multiple_choice_prompt(f"Which word {i}?" + " x" * i, choices), choices=choices, label=0
        )
        for i, choices in enumerate(
            [("red", "green blue", "a"), ("one", "two three four", "five", "six"), ("yes", "no")] * 3
        )
    ]
    expected = reference_text_scores(model, tokenizer, items)
    paths = [dict(reuse_context=True, row_tokens=n) for n in (1, 40, 512)]  # one question per row .. all in one
    for path in paths + [dict(reuse_context=False)]:  # packed questions, then left-padded full sequences
        fast = score_text(model, tokenizer, items, batch_size=5, **path)
        for got, want in zip(fast.option_logprobs, expected):
            assert got == pytest.approx(want, abs=1e-4)
        assert fast.pred.tolist() == [int(np.argmax(row)) for row in expected]
    normed = score_text(model, tokenizer, items, normalize="length", batch_size=5)
    assert normed.option_logprobs[0][1] == pytest.approx(expected[0][1] / len(" green blue"), abs=1e-5)


def test_encode_pair_moves_trailing_spaces_into_the_continuation():
    from chainforget.scoring import encode_pair

    tokenizer = tiny_tokenizer()
    assert encode_pair(tokenizer, "Answer: ", "red") == encode_pair(tokenizer, "Answer:", " red")


def test_length_bucketing_keeps_every_sample_once_and_cuts_padding():
    from conftest import FIXTURES

    from chainforget import tasks
    from chainforget.config import TaskSpec
    from lightning_modules.stage import StageDataModule

    data = {
        "csqa": tasks.load("csqa", TaskSpec(source="release", path=str(FIXTURES / "csqa")), seed=0),
        "bbq": tasks.load("bbq", TaskSpec(source="release", path=str(FIXTURES / "bbq")), seed=0),
    }

    def padding(bucket):
        module = StageDataModule.prepared(
            data, tiny_tokenizer(), mixture="bbq+csqa", batch_size=8, steps=40, max_seq_len=512, seed=3, bucket=bucket
        )
        module.setup()
        batches = module.batches()
        assert sorted(i for b in batches for i in b) == list(range(320)) and all(len(b) == 8 for b in batches)
        loaded = list(module.train_dataloader())
        return sum((b["attention_mask"] == 0).sum().item() for b in loaded) / sum(
            b["attention_mask"].numel() for b in loaded
        )

    plain, bucketed = padding(False), padding(True)
    assert bucketed < 0.10 < plain
