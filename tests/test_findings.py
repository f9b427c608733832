"""The published findings (docs/results) are exactly what their committed run records give, and the finding
tables compute what they claim on hand-made records."""

import functools
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT

from analysis.findings import curvature_correlations, findings_tables, sam_vs_plain
from analysis.runs import load_records

RESULTS = ROOT / "docs" / "results"
# each published study (letter answers; the regime that teaches) and the Optuna studies its run records come from
PUBLISHED = {
    RESULTS: {"findings-order", "findings-replay", "findings-replay-toxigen", "findings-sam"},
    RESULTS / "text-regime": {
        *("findings-text-order-toxigen", "findings-text-order-bbq", "findings-text-mitigations"),
        *("findings-text-replay", "findings-text-sam", "findings-text-order-gemma"),
    },
}
TABLES = [(folder, p.stem) for folder in PUBLISHED for p in sorted((folder / "tables").glob("*.csv"))]


@functools.cache
def rebuilt_tables(folder: Path) -> dict[str, pd.DataFrame]:
    return findings_tables(load_records(folder / "runs"))


@pytest.mark.parametrize(("folder", "name"), TABLES, ids=[f"{f.name}/{n}" for f, n in TABLES])
def test_published_csv_equals_the_table_rebuilt_from_the_committed_run_records(folder, name):
    rebuilt = rebuilt_tables(folder)[name]
    published = pd.read_csv(folder / "tables" / f"{name}.csv", keep_default_na=True)
    assert len(published) == len(rebuilt) > 0
    round_trip = pd.read_csv(pd.io.common.StringIO(rebuilt.to_csv(index=False)))
    pd.testing.assert_frame_equal(published, round_trip, check_exact=False, rtol=1e-9)


@pytest.mark.parametrize("folder", list(PUBLISHED), ids=lambda folder: folder.name)
def test_every_study_is_published_with_every_table_it_gives(folder):
    names = {p.name.rsplit("-trial", 1)[0] for p in (folder / "runs").iterdir()}
    assert names == PUBLISHED[folder]
    written = {name for name, table in rebuilt_tables(folder).items() if not table.empty}
    assert {p.stem for p in (folder / "tables").glob("*.csv")} == written
    assert len(written) >= 6  # asymmetry, groups, biased forgetting, curvature points and correlation, power


def test_sam_vs_plain_pairs_runs_by_seed():
    points = pd.DataFrame(
        [
            {"condition": "bbq → csqa", "seed": s, "mitigation": m, "top_eigenvalue": lam, "F": f}
            for s, m, lam, f in [
                (0, "none", 10.0, 6.0),
                (1, "none", 12.0, 8.0),
                (0, "sam", 4.0, 3.0),
                (1, "sam", 8.0, 5.0),
                (2, "none", 99.0, 99.0),
            ]  # seed 2 has no SAM run: left out of the pairing
        ]
    )
    (row,) = sam_vs_plain(points).to_dict("records")
    assert row["seeds"] == 2 and row["top_eigenvalue_plain"] == 11.0 and row["top_eigenvalue_sam"] == 6.0
    assert row["top_eigenvalue_diff"] == -5.0 and row["F_diff"] == -3.0
    # differences -6 and -4: mean -5, t(0.975, 1) * sd / sqrt(2) = 12.706 * 1.414 / 1.414
    assert row["top_eigenvalue_diff_lo"] == pytest.approx(-5.0 - 12.7062047, rel=1e-6)


def forgetting_record(seed: int, bf_a: float) -> dict:
    def row(group, kind, f, bf, ci):
        return {
            "task": "bbq",
            "trained_stage": 1,
            "later_stage": 2,
            "group_kind": kind,
            "group": group,
            "n": 40,
            "F": f,
            "F_ci": [f - 1, f + 1],
            "BF": bf,
            "BF_ci": ci,
            "small": False,
        }

    return {
        "run_name": f"r{seed}",
        "config": {"order": ["bbq", "csqa"], "seed": seed},
        "mitigation": {"name": "none", "kind": "none", "knobs": []},
        "metrics": {
            "forgetting": [
                row("all", "all", 5.0, None, None),
                row("a", "category", 5.0 + bf_a, bf_a, [2.0, 18.0]),
                row("b", "category", 0.0, -5.0, [-12.0, 1.0]),
            ],
            "biased_forgetting": [
                {
                    "task": "bbq",
                    "group_kind": "category",
                    "worst_group": "a",
                    "BF": bf_a,
                    "spread": 5.0 + bf_a,
                    "std": 1.0,
                    "n_groups": 2,
                    "excluded": [],
                    "BF_ci": [2.0, 18.0],
                }
            ],
        },
    }


def test_groups_count_as_unequal_only_when_their_paired_bf_interval_excludes_zero():
    from analysis.findings import biased_forgetting_over_seeds, group_forgetting_over_seeds

    records = [forgetting_record(0, 10.0), forgetting_record(1, 14.0)]
    groups = group_forgetting_over_seeds(records).set_index("group")
    assert groups.loc["a", "seeds_beyond_interval"] == 2 and groups.loc["b", "seeds_beyond_interval"] == 0
    assert groups.loc["a", "F"] == 17.0  # (15 + 19) / 2
    (row,) = biased_forgetting_over_seeds(records).to_dict("records")
    assert (row["group_runs_tested"], row["group_runs_beyond_interval"], row["share_beyond"]) == (4, 2, 0.5)
    assert row["BF"] == 12.0 and row["spread"] == 17.0 and row["worst_groups"] == "a"
    # spreads 15 and 19: 17 -+ 12.706 * 2.828 / 1.414 = 17 -+ 25.4; a spread is never below 0
    assert row["spread_lo"] == 0.0 and row["spread_hi"] == pytest.approx(17 + 12.7062047 * 2, rel=1e-6)
    # group a below the size that counts in seed 1 only: it still counts in seed 0 (3 pairs tested, 1 beyond)
    records[1]["metrics"]["forgetting"][1]["small"] = True
    (row,) = biased_forgetting_over_seeds(records).to_dict("records")
    assert (row["group_runs_tested"], row["group_runs_beyond_interval"]) == (3, 1)


def test_published_learning_table_equals_the_one_rebuilt_from_the_committed_regime_records():
    from analysis.tables import learning_table

    runs = sorted((RESULTS / "regime" / "runs").glob("*/run.json"))
    assert len(runs) >= 20  # the regime study's grid (5 tasks x 4 presets), found: an empty folder checks nothing
    rebuilt = learning_table(load_records(RESULTS / "regime" / "runs"))
    published = pd.read_csv(RESULTS / "regime" / "learning.csv")
    round_trip = pd.read_csv(pd.io.common.StringIO(rebuilt.to_csv(index=False)))
    pd.testing.assert_frame_equal(published, round_trip, check_exact=False, rtol=1e-9)


def mitigation_record(name: str, strength: float, seed: int, f: float, bf: float, csqa: float, stages: int = 2):
    return {
        "run_name": f"{name}-{strength}-{seed}",
        "config": {"order": ["bbq", "csqa"], "seed": seed, "mitigation": {"name": name, "strength": strength}},
        "mitigation": {"name": name, "kind": name, "knobs": ["strength"] if name != "none" else []},
        "tasks": {"bbq": {"role": "safety"}, "csqa": {"role": "capability"}},
        "stages": [{"index": k} for k in range(1, stages + 1)],
        "eval": [{"stage": stages, "task": "csqa", "group_kind": "all", "group": "all", "acc": csqa}],
        "metrics": {
            "forgetting": [{"task": "bbq", "group_kind": "all", "group": "all", "F": f}],
            "biased_forgetting": [{"task": "bbq", "group_kind": "context", "BF": bf}],
            "example_forgetting": [
                {"task": "bbq", "group_kind": "all", "group": "all", "forgotten": f + 5, "forgotten_adj": f - 5}
            ],
        },
    }


def test_mitigations_are_compared_with_plain_chains_and_plain_replay_paired_by_seed():
    from analysis.findings import mitigation_comparison

    records = [mitigation_record("none", 0.0, s, f, 30.0, 0.5) for s, f in enumerate([40.0, 44.0, 38.0])]
    records += [mitigation_record("replay_mix", 0.05, s, f, 20.0, 0.5) for s, f in enumerate([30.0, 32.0, 31.0])]
    # seed 2 has no safety_anchor run: pairs over seeds 0 and 1 only
    anchored = [(0, 20.0, 9.0), (1, 26.0, 11.0)]
    records += [mitigation_record("safety_anchor", 0.01, s, f, bf, 0.45) for s, f, bf in anchored]
    records += [mitigation_record("sam", 0.05, 0, 0.0, 0.0, 0.5)]  # acts in stage 1: left out
    table = mitigation_comparison(records).set_index(["mitigation", "measure"])
    assert set(table.index.get_level_values("mitigation")) == {"none", "replay_mix 0.05", "safety_anchor 0.01"}
    anchor = table.loc[("safety_anchor 0.01", "F")]
    assert anchor["condition"] == "bbq → csqa, 2 stages" and anchor["seeds"] == 2 and anchor["mean"] == 23.0
    assert anchor["vs_none"] == -19.0  # (20 - 40 + 26 - 44) / 2
    assert anchor["vs_replay"] == -8.0  # (20 - 30 + 26 - 32) / 2
    # differences -20 and -18: t = -19 / (sqrt(2) / sqrt(2)) on 1 df
    assert anchor["p_vs_none"] == pytest.approx(1 - 2 * math.atan(19) / math.pi)
    assert table.loc[("safety_anchor 0.01", "BF (context)"), "vs_none"] == -20.0
    assert table.loc[("safety_anchor 0.01", "csqa accuracy"), "vs_none"] == pytest.approx(-5.0)
    assert table.loc[("safety_anchor 0.01", "forgotten_adj"), "mean"] == 18.0
    assert pd.isna(table.loc[("none", "F"), "vs_none"]) and pd.isna(table.loc[("none", "F"), "vs_replay"])
    replay = table.loc[("replay_mix 0.05", "F")]  # judged against plain chains only
    assert replay["vs_none"] == pytest.approx(-(10 + 12 + 7) / 3) and pd.isna(replay["vs_replay"])


def test_a_mitigation_that_adds_a_stage_is_judged_against_chains_of_its_length():
    """group_replay's third stage against a third stage without replay (replay_stage r = 0, the train-longer
    control) and with uniform replay at the same 5 % share; the two-stage plain chains are another condition."""
    from analysis.findings import mitigation_comparison

    records = [mitigation_record("none", 0.0, s, 40.0, 30.0, 0.5) for s in (0, 1)]
    records += [
        mitigation_record("replay_stage", r, s, f, 9.0, 0.5, stages=3)
        for r, f in ((0.0, 35.0), (0.05, 12.0), (0.2, 5.0))
        for s in (0, 1)
    ]
    records += [mitigation_record("group_replay", 0.3, s, f, 8.0, 0.5, stages=3) for s, f in ((0, 10.0), (1, 11.0))]
    table = mitigation_comparison(records).set_index(["condition", "mitigation", "measure"])
    dro = table.loc[("bbq → csqa, 3 stages", "group_replay 0.3", "F")]
    assert dro["vs_none"] == -24.5 and dro["vs_replay"] == -1.5  # against r = 0 (35) and r = 0.05 (12)
    assert pd.isna(table.loc[("bbq → csqa, 3 stages", "replay_stage 0.05", "F"), "vs_replay"])  # it is the reference
    assert table.loc[("bbq → csqa, 3 stages", "replay_stage 0.2", "F"), "vs_replay"] == -7.0
    assert ("bbq → csqa, 2 stages", "none", "F") not in table.index  # nothing else in two-stage chains: no comparison
    assert table.loc[("bbq → csqa, 3 stages", "group_replay 0.3", "csqa accuracy"), "mean"] == 50.0  # after stage 3
    # a second group_replay run of seed 0 that differs in a knob the label does not show: one value per seed
    records.append({**mitigation_record("group_replay", 0.3, 0, 14.0, 8.0, 0.5, stages=3), "run_name": "again"})
    dro = mitigation_comparison(records).set_index(["condition", "mitigation", "measure"])
    assert dro.loc[("bbq → csqa, 3 stages", "group_replay 0.3", "F"), ["seeds", "mean"]].tolist() == [2, 11.5]


def test_the_mitigation_figure_draws_each_measure_with_the_plain_mean_dashed(tmp_path):
    from analysis.findings import mitigation_comparison
    from analysis.plots import mitigation_figure, save

    records = [mitigation_record("none", 0.0, s, f, 30.0, 0.5) for s, f in enumerate([40.0, 44.0, 38.0])]
    records += [mitigation_record("replay_mix", 0.05, s, f, 20.0, 0.5) for s, f in enumerate([30.0, 32.0, 31.0])]
    fig = mitigation_figure(mitigation_comparison(records), "bbq → csqa, 2 stages")
    assert [ax.get_xlabel() for ax in fig.axes] == [
        "F (pp)",
        "BF (context) (pp)",
        "forgotten_adj (pp)",
        "csqa accuracy (pp)",
    ]
    assert fig.axes[0].lines[-1].get_xdata()[0] == pytest.approx(122 / 3)  # the plain chains' mean F, dashed
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["none", "replay_mix 0.05"]
    save(fig, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def curvature_record(model: str, index: int, eigenvalue: float, forgetting: float) -> dict:
    return {
        "run_name": f"{model}-{index}",
        "config": {"order": ["bbq", "csqa"], "model": {"name": model}},
        "stages": [{"curvature": {"top_eigenvalue": eigenvalue, "converged": True}}],
        "metrics": {"forgetting": [{"task": "bbq", "group_kind": "all", "later_stage": 2, "F": forgetting}]},
        "mitigation": {"name": "none"},
    }


def test_curvature_is_correlated_with_forgetting_within_each_model():
    # within each model the ranks agree perfectly, one way and the other; pooled, model b's larger eigenvalues would
    # pair with its forgetting across models
    records = [curvature_record("a", i, lam, f) for i, (lam, f) in enumerate([(1, 10), (2, 20), (3, 30)])]
    records += [curvature_record("b", i, lam, f) for i, (lam, f) in enumerate([(10, 30), (20, 20), (30, 10)])]
    table = curvature_correlations(records)
    assert table[["model", "task", "n"]].values.tolist() == [["a", "bbq", 3], ["b", "bbq", 3]]
    assert table["spearman"].tolist() == pytest.approx([1.0, -1.0])
    assert "model" not in curvature_correlations(records[:3]).columns  # one model: no column for it
