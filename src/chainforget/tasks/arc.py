"""ARC, the AI2 Reasoning Challenge (Clark et al. 2018, ARC-V1-Feb2018), a capability task: ``arc_challenge``
(``arc`` for short) and ``arc_easy``.

Sources: ``release`` reads ``ARC-<Set>-Train.jsonl`` (train) and ``ARC-<Set>-Test.jsonl`` (eval) from a local
directory (searched recursively, so the unpacked release zip works) or from the release zip at a URL;
``hub`` reads e.g. ``allenai/ai2_arc:ARC-Challenge``. Rows: ``{id, question: {stem, choices: [{text, label}]},
answerKey}``; answer keys are letters or digits and a few questions have 3 or 5 choices, all re-lettered A, B, ...
"""

from __future__ import annotations

from chainforget.config import TaskSpec
from chainforget.errors import DataError
from chainforget.tasks import Example, Task, register
from chainforget.tasks.csqa import hub_example, release_example
from chainforget.tasks.downloads import hub_splits, read_jsonl, release_archive

RELEASE_URL = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"


class ARC(Task):
    role = "capability"
    sources = ("release", "hub")
    subset = "Challenge"

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        if spec.source == "hub":
            return hub_splits(spec.path or f"allenai/ai2_arc:ARC-{self.subset}", hub_example, ("test",))
        files = release_archive(spec.path, RELEASE_URL, f"ARC-{self.subset}-*.jsonl", f"arc_{self.subset.lower()}")
        parts = {}
        for split, suffix in (("train", "Train"), ("eval", "Test")):
            path = next((p for p in files if p.name == f"ARC-{self.subset}-{suffix}.jsonl"), None)
            if path is None:
                raise DataError(
                    f"{spec.path or RELEASE_URL}: ARC release file ARC-{self.subset}-{suffix}.jsonl not found"
                )
            parts[split] = [release_example(row, str(path), n) for n, row in read_jsonl(path)]
        return parts


@register
class ARCChallenge(ARC):
    name = "arc_challenge"


@register
class ARCShort(ARC):
    """``arc``: the Challenge set, as in the paper."""

    name = "arc"


@register
class ARCEasy(ARC):
    name = "arc_easy"
    subset = "Easy"
