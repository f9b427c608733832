"""Random mutations of a valid chain config (wrong types, numbers out of range or not finite, huge, unknown keys,
deleted keys, strings for lists, lists for scalars, blocks replaced by scalars), in the file or as command-line
overrides, each checked the way `chainforget chain` checks a config before it reads data or loads a model
(`chainforget.cli.check_chain`): it passes, or it is a ConfigError/DataError of one line; any other exception is a
bug. No mutant may write or change a file. A few refused ones also go through the real command."""

import copy
import hashlib
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from chainforget.cli import check_chain
from chainforget.config import parse_chain
from chainforget.errors import ConfigError, DataError

SEED = 18
MUTANTS = 300
# Values of the wrong kind or outside every range: non-finite, negative, huge, empty, nested where a scalar is due,
# and strings that mean something somewhere (mitigation names, stage mixtures, Lightning options)
ODD = [
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    -0.5,
    10**30,
    -(10**30),
    2**64,
    1e308,
    1e-320,
    "",
    "text",
    "1e400",
    "../..",
    "a" * 300,
    "nul\x00byte",
    True,
    False,
    None,
    [],
    {},
    [1, "a"],
    [[1]],
    {"x": 1},
    "replay_stage",
    "sam",
    "bbq:nan",
    "bbq+csqa:1e400",
    "gpu",
    "ddp",
    "warn",
]


def valid_config(root: Path) -> dict:
    """smoke.yaml with every field spelt out (so each is a target), its data paths absolute, writing under root."""
    config = parse_chain(["--config", str(ROOT / "sweeps" / "configs" / "smoke.yaml")], "test").to_dict()
    for task in config["tasks"].values():
        task["path"] = str(ROOT / task["path"])
    return {**config, "out": str(root / "runs"), "cache_dir": str(root / "cache")}


def places(tree, path=()):
    """Every key path in ``tree``: blocks, leaves and list items."""
    yield path
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from places(value, (*path, key))


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def mutate(tree: dict, rng: random.Random) -> tuple[dict, str]:
    """``tree`` with one random mutation, and what it did."""
    tree = copy.deepcopy(tree)
    path = rng.choice(list(places(tree))[1:])
    parent, key, value = get(tree, path[:-1]), path[-1], get(tree, path)
    kind = rng.choice(["odd", "odd", "delete", "unknown", "string_for_list", "list_for_scalar", "block_to_scalar"])
    if kind == "delete":
        del parent[key]
    elif kind == "unknown" and isinstance(parent, dict):
        parent[f"{key}x"] = value  # a misspelt key beside (or instead of) the right one
        if rng.random() < 0.5:
            del parent[key]
    elif kind == "string_for_list" and isinstance(value, list):
        parent[key] = ",".join(map(str, value))
    elif kind == "list_for_scalar" and not isinstance(value, (list, dict)):
        parent[key] = [value]
    elif kind == "block_to_scalar" and isinstance(value, dict):
        parent[key] = rng.choice([5, "x", None, True])
    else:
        kind, parent[key] = "odd", rng.choice(ODD)
    new = "" if kind in ("delete", "unknown") else f" = {parent[key]!r:.60}"
    return tree, f"{kind} {'.'.join(map(str, path))}{new}"


def odd_flag(tree: dict, rng: random.Random) -> str:
    """A command-line override setting a random key to a random odd value (in YAML, as the parser reads it)."""
    path = rng.choice([p for p in places(tree) if p and all(isinstance(k, str) for k in p)])
    value = yaml.safe_dump(rng.choice(ODD), default_flow_style=True, width=1000).removesuffix("...\n").strip()
    return f"--{'.'.join(path)}={value}"


def mutants(root: Path, count: int = MUTANTS):
    """``(number, config, flags, description)`` for ``count`` mutants, one to three mutations each."""
    rng = random.Random(SEED)
    base = valid_config(root)
    for number in range(count):
        tree, flags, done = base, [], []
        for _ in range(rng.choice([1, 1, 2, 3])):
            if rng.random() < 0.2:
                flags.append(odd_flag(base, rng))
                done.append(flags[-1])
            else:
                tree, what = mutate(tree, rng)
                done.append(what)
        yield number, tree, flags, "; ".join(done)


def arguments(tree: dict, flags: list[str], folder: Path) -> list[str]:
    path = folder / "mutant.yaml"
    path.write_text(yaml.dump(tree, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), width=1000))
    return ["--config", str(path), *flags]


def refusal(argv: list[str]) -> str | None:
    """``check_chain``'s one-line refusal of ``argv``, or None when it passes; any other exception propagates."""
    try:
        check_chain(argv, "test")
    except (ConfigError, DataError) as exc:
        return str(exc)
    return None


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under ``root`` but the mutants themselves, by content."""
    files = [p for p in root.rglob("*") if p.is_file() and "mutants" not in p.relative_to(root).parts]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A directory to run in (a relative `out` lands here), with an earlier run and a cache entry to keep."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "earlier").mkdir(parents=True)
    (tmp_path / "runs" / "earlier" / "run.json").write_text('{"kept": true}')
    (tmp_path / "cache" / "stages" / "key").mkdir(parents=True)
    (tmp_path / "cache" / "stages" / "key" / "weights.safetensors").write_bytes(b"weights")
    (tmp_path / "mutants").mkdir()
    return tmp_path


def test_every_mutant_passes_or_is_refused_in_one_line_and_writes_nothing(workdir):
    before = fingerprint(workdir)
    refused, bugs = 0, []
    for number, tree, flags, what in mutants(workdir):
        try:
            message = refusal(arguments(tree, flags, workdir / "mutants"))
        except Exception as exc:  # noqa: BLE001 - every other exception is what this test looks for
            bugs.append(f"mutant {number} ({what}): {type(exc).__name__}: {exc}")
            continue
        if message is not None:
            refused += 1
            if "\n" in message or not message.strip():
                bugs.append(f"mutant {number} ({what}): a message of {len(message.splitlines())} lines: {message!r}")
        assert fingerprint(workdir) == before, f"mutant {number} ({what}) wrote or changed a file"
    assert not bugs, "\n".join(bugs)
    assert 0.5 * MUTANTS < refused < 0.98 * MUTANTS  # the mutants reach both outcomes, not one


def test_refused_mutants_exit_2_with_that_line_from_the_real_command(workdir):
    refused = [m for m in mutants(workdir, 100) if refusal(arguments(m[1], m[2], workdir / "mutants")) is not None]
    before = fingerprint(workdir)
    command = Path(sys.executable).with_name("chainforget")
    for number, (_, tree, flags, what) in enumerate(refused[:: len(refused) // 5][:5]):
        (workdir / "mutants" / str(number)).mkdir()
        argv = arguments(tree, flags, workdir / "mutants" / str(number))
        message = refusal(argv)
        done = subprocess.run([str(command), "chain", *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, (what, done.stderr)
        # the same line, up to the order of a list of names Lightning keeps in a set
        assert words(done.stderr) == words(f"chainforget chain: error: {message}"), what
    assert fingerprint(workdir) == before


def words(line: str) -> list[str]:
    return sorted(word.strip(",.") for word in line.split())


def test_a_device_list_on_the_cpu_is_refused_in_one_line(workdir):
    tree = valid_config(workdir)
    tree["trainer"]["devices"] = [1]
    assert "trainer" in refusal(arguments(tree, [], workdir / "mutants"))
