"""What the README promises is in the repository: every file it names is tracked by git (an ignore pattern
once hid sweeps/wandb/), and every config it names loads with the project's own readers."""

import re
import subprocess

import pytest
from conftest import ROOT

from chainforget.config import parse_chain
from lightning_modules.search import agent_command, as_override, load_study_spec, load_sweep

NAMED = re.compile(
    r"(?:sweeps|src|analysis|lightning_modules|benchmarks|docs|tests)/[A-Za-z0-9_./-]+\.(?:ya?ml|py|ipynb|md|json|csv|png)"
)


def readme_paths() -> list[str]:
    return sorted(set(NAMED.findall((ROOT / "README.md").read_text(encoding="utf-8"))))


def tracked(pattern: str = ".") -> set[str]:
    done = subprocess.run(["git", "ls-files", "--", pattern], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return set(done.stdout.splitlines())


def test_every_file_the_readme_names_is_tracked_by_git():
    named = readme_paths()
    assert len(named) >= 10  # the README names its sweeps, configs, notebook and results
    files = tracked()
    missing = [path for path in named if path not in files]
    assert not missing, f"README.md names files git does not track (ignored or never added): {missing}"


def test_every_config_the_readme_names_loads(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name data paths relative to the repository root
    named = [path for path in readme_paths() if path.endswith(".yaml") and path.startswith("sweeps/")]
    kinds = {kind: [p for p in named if p.startswith(f"sweeps/{kind}/")] for kind in ("wandb", "optuna", "configs")}
    assert all(kinds.values()), f"the README names no file in one of sweeps/{{wandb,optuna,configs}}: {kinds}"
    for path in kinds["wandb"]:
        sweep = load_sweep(ROOT / path)
        command = agent_command(sweep, {})
        parse_chain(command[command.index("chain") + 1 :], "test")
    for path in kinds["optuna"]:  # a study's base configs with its overrides and each parameter's first choice
        spec = load_study_spec(ROOT / path)
        bases = [arg for base in spec["base"] for arg in ("--config", base)]
        first = [
            as_override(name, param.get("choices", [param.get("low")])[0]) for name, param in spec["params"].items()
        ]
        parse_chain([*bases, *spec.get("overrides", []), *first], "test")
    for path in kinds["configs"]:
        if path == "sweeps/configs/stage_smoke.yaml":  # a LightningCLI config, read by tests/test_lightning_cli.py
            continue
        # a snippet combines with a chain config: a mitigation, a model preset
        snippet = path.startswith(("sweeps/configs/mitigations/", "sweeps/configs/llama2_7b/"))
        parse_chain([*(["--config", "sweeps/configs/smoke.yaml"] if snippet else []), "--config", path], "test")


@pytest.mark.parametrize("folder", ["sweeps/wandb", "sweeps/optuna", "sweeps/configs", "sweeps/configs/mitigations"])
def test_the_folders_tests_loop_over_are_tracked_and_not_empty(folder):
    assert {path for path in tracked(folder) if path.endswith(".yaml")}, f"git tracks no YAML file in {folder}"
