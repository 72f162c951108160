"""The arithmetic study's figure layer: tables (their numbers, not just their files), loaders, rendering."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lens.exit_gate import exit_distribution
from lens.layout import UnrolledLayout
from studies.figures import FIGURES, Layout, pick_block, render_all
from studies.figures import depth_scaling as ds
from studies.figures import exit_gate as eg
from studies.figures import intermediate_vs_final as ivf
from studies.figures import latent_dynamics as dyn
from studies.figures import numeric_prefix as npx
from studies.figures import rank_trajectory as rt
from studies.figures import reference_overlay as ro
from studies.figures.patching import PATCHING_FIGURES
from studies.figures.stats import last_position
from studies.reference_data import (
    FILTERED_ID_OFFSET,
    HUGINN_LAYOUT,
    load_reference_answers,
    load_reference_ranks,
    load_reference_topk,
)

LAYOUT = Layout(UnrolledLayout(prelude=1, core=2, coda=1), steps=4)
N_PROMPTS = 16
LENSES = ("logit", "coda", "tuned")
WRONG_RANK = 99_999  # every rank of an incorrectly answered problem, so any leak shows
TOKENS = [" 3", "7", "-", " -2", " the", "\n", " 12", "abc", "", "  ", "x9"]


def _answer(pid: int) -> tuple[int, int]:
    """(intermediate digit, answer) of synthetic problem ``pid``."""
    return pid % 10, (pid * 7 + 3) % 10


def _correct(pid: int) -> bool:
    return pid % 3 != 0


def synthetic_tables(
    seed: int = 0, layout: Layout = LAYOUT, n_prompts: int = N_PROMPTS
) -> dict[str, pd.DataFrame]:
    """Every input table of the figures, for ``n_prompts`` fake problems (prompt ids % 3 == 0 wrong)."""
    rng = np.random.default_rng(seed)
    sites = [
        (f"{s}.{j}", t, j, layout.unrolled_index(s, t, j))
        for s, t, j in [layout.locate(u) for u in range(layout.n_unrolled)]
    ]
    sites += [("embed", 0, -1, -1), ("latent", layout.steps, -1, -1), ("final", 0, -1, -1)]
    kinds = ["predicted", "final", "intermediate", "intermediate_alt", "control"] + [
        f"digit_{d}" for d in range(10)
    ]
    rows, tops = [], []
    for pid in range(n_prompts):
        inter, ans = _answer(pid)
        ids = {
            "predicted": 100 + ans,
            "final": 100 + ans,
            "intermediate": 100 + inter,
            "intermediate_alt": 200 + inter,
            "control": 300,
        }
        ids.update({f"digit_{d}": 100 + d for d in range(10)})
        for lens in LENSES:
            for site, t, j, u in sites:
                depth = max(u, 0) / layout.n_unrolled
                for kind in kinds:
                    rank = int(1 + np.exp(rng.normal(6 * (1 - depth), 1.5)))
                    if kind in ("final", "intermediate", "intermediate_alt", "control") or kind.startswith(
                        "digit"
                    ):
                        rank = rank if _correct(pid) else WRONG_RANK
                    rows.append((pid, -1, site, t, j, u, lens, kind, ids[kind], rank))
                if u >= 0 and not (lens == "coda" and site.startswith("coda")):
                    for k in range(1, 6):
                        tops.append((pid, -1, site, t, j, u, lens, k, 0, TOKENS[rng.integers(len(TOKENS))]))
    ranks = pd.DataFrame(
        rows,
        columns=[
            "prompt_id",
            "position",
            "site",
            "iteration",
            "block",
            "unrolled_index",
            "lens",
            "target_kind",
            "token_id",
            "rank",
        ],
    )
    ranks["logprob"] = -np.log(ranks["rank"].astype(float))
    ranks["entropy"], ranks["kl_to_final"], ranks["token"] = 1.0, 0.1, "?"
    topk = pd.DataFrame(
        tops,
        columns=[
            "prompt_id",
            "position",
            "site",
            "iteration",
            "block",
            "unrolled_index",
            "lens",
            "k",
            "token_id",
            "token",
        ],
    )
    topk["logprob"] = -1.0
    answers = pd.DataFrame(
        [
            {
                "prompt_id": pid,
                "task": "arithmetic_1dc",
                "num_steps": layout.steps,
                "prompt": f"Q{pid}",
                "expected": "-3" if pid == 4 else str(_answer(pid)[1]),
                "generated": "?",
                "correct": _correct(pid),
                "first_token_id": 100,
                "intermediate": str(_answer(pid)[0]),
            }
            for pid in range(n_prompts)
        ]
    )
    # the same prompts at another depth, with the opposite verdict: must be ignored
    answers = pd.concat(
        [answers, answers.assign(num_steps=2 * layout.steps, correct=~answers["correct"])], ignore_index=True
    )
    dyn_rows, verdicts = [], []
    for pid in range(n_prompts):
        for site in ("core.0", "core.1"):
            pcs = np.cumsum(rng.normal(size=(layout.steps, 2)), axis=0)
            for t in range(1, layout.steps + 1):
                dyn_rows.append(
                    {
                        "prompt_id": pid,
                        "position": -1,
                        "site": site,
                        "iteration": t,
                        "step_norm": np.nan if t == 1 else 0.5**t * rng.uniform(0.5, 1.5),
                        "cos_to_last": 1 - 0.1 * (layout.steps - t) * rng.uniform(0.5, 1),
                        "norm": 10.0,
                        "pc1": pcs[t - 1, 0],
                        "pc2": pcs[t - 1, 1],
                        "pc3": 0.0,
                    }
                )
            verdicts.append(
                {
                    "prompt_id": pid,
                    "position": -1,
                    "site": site,
                    "verdict": ["fixed-point", "cycle-2", "drift"][pid % 3],
                }
            )
    depth = pd.DataFrame(
        [
            {"task": task, "num_steps": s, "n": 20, "correct": c}
            for task, base in (("arithmetic_1dc", 2), ("arithmetic_2da", 0))
            for s, c in zip((1, 2, 4, 8), (base, base + 5, base + 12, base + 15), strict=True)
        ]
    )
    depth["accuracy"] = depth["correct"] / depth["n"]
    lam = torch.tensor(rng.uniform(0.05, 0.95, size=(n_prompts, layout.steps)))
    pdf, cdf = exit_distribution(lam)
    gate = pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(n_prompts), layout.steps),
            "position": -1,
            "iteration": np.tile(np.arange(1, layout.steps + 1), n_prompts),
            "num_steps": layout.steps,
            "gate_lambda": lam.numpy().ravel(),
            "exit_prob": pdf.numpy().ravel(),
            "exit_cdf": cdf.numpy().ravel(),
        }
    )
    return {
        "ranks": ranks,
        "topk": topk,
        "answers": answers,
        "dynamics": pd.DataFrame(dyn_rows),
        "verdicts": pd.DataFrame(verdicts),
        "depth": depth,
        "exit_gate": gate,
    }


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return synthetic_tables()


# ---------------------------------------------------------------- layout and statistics
def test_layout_round_trip():
    assert LAYOUT.n_unrolled == 1 + 4 * 2 + 1 == len(LAYOUT.frame())
    for u in range(LAYOUT.n_unrolled):
        assert LAYOUT.unrolled_index(*LAYOUT.locate(u)) == u
    assert HUGINN_LAYOUT.n_unrolled == 68
    assert HUGINN_LAYOUT.locate(65) == ("core", 16, 3)


def test_layout_comes_from_the_manifest(tables):
    manifest = {"model": {"layout": LAYOUT.layout.to_dict()}, "settings": {"steps": 4}}
    assert Layout.from_manifest(manifest) == LAYOUT
    legacy = {"model": {"layout": {"prelude": 1, "core": 2, "coda": 1}}, "settings": {"steps": 4}}
    assert Layout.from_manifest(legacy) == LAYOUT  # runs from before families were Huginn's
    # the rows agree with the layout they were written under
    blocks = tables["ranks"].query("unrolled_index >= 0").drop_duplicates("unrolled_index")
    expected = LAYOUT.frame().set_index("unrolled_index")
    for row in blocks.itertuples():
        site, iteration = (
            expected.at[row.unrolled_index, "site"],
            expected.at[row.unrolled_index, "iteration"],
        )
        assert (row.site, row.iteration) == (site, iteration)
    ref = load_reference_ranks().query("unrolled_index >= 0")
    assert ref["unrolled_index"].max() == HUGINN_LAYOUT.n_unrolled - 1
    with pytest.raises(ValueError, match="no model layout"):
        Layout.from_manifest({"model": {}, "settings": {"steps": 4}})


def test_last_position_keeps_the_last_token():
    df = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "position": [3, 7, 2, 5], "rank": [1, 2, 3, 4]})
    assert last_position(df)["rank"].tolist() == [2, 4]
    with_last = df.assign(position=[3, -1, 2, 5])
    assert last_position(with_last)["rank"].tolist() == [2, 4]


# ---------------------------------------------------------------- figure 1
def test_rank_trajectory_table(tables):
    tab = rt.table(tables, LAYOUT)
    assert set(tab["lens"]) == set(LENSES)
    src = tables["ranks"]
    src = src[(src["target_kind"] == "predicted") & (src["unrolled_index"] >= 0)]
    for lens in LENSES:
        d = tab[tab["lens"] == lens]
        assert d["unrolled_index"].tolist() == list(range(LAYOUT.n_unrolled))  # -1 rows excluded
        assert d["stage"].tolist() == ["prelude"] + ["core"] * 8 + ["coda"]
        assert d["iteration"].tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 0]
    assert (tab["n"] == N_PROMPTS).all()
    assert (tab["median"] >= 1).all() and (tab["ci_low"] >= 1).all()
    assert (tab["ci_low"] <= tab["median"]).all() and (tab["median"] <= tab["ci_high"]).all()
    bounds = src.groupby(["lens", "unrolled_index"])["rank"].agg(["min", "max", "median"]).reset_index()
    merged = tab.merge(bounds, on=["lens", "unrolled_index"])
    assert len(merged) == len(tab)
    assert ((merged["min"] <= merged["median_x"]) & (merged["median_x"] <= merged["max"])).all()
    assert np.allclose(merged["median_x"], merged["median_y"])
    assert ((merged["min"] <= merged["geo_mean"]) & (merged["geo_mean"] <= merged["max"])).all()


def test_rank_trajectory_headline(tables):
    tab = rt.table(tables, LAYOUT)
    h = rt.headline(tab, LAYOUT)
    assert h["n_prompts"] == N_PROMPTS
    for lens in LENSES:
        assert h[f"{lens}_median_rank_last"] >= 1
        assert 0 <= h[f"{lens}_top1_share_last"] <= 1


# ---------------------------------------------------------------- figure 2
def test_is_numeric():
    assert [npx.is_numeric(t) for t in TOKENS] == [
        True,
        True,
        True,
        True,
        False,
        False,
        True,
        False,
        False,
        False,
        False,
    ]


def test_numeric_prefix_table(tables):
    tab = npx.table(tables, LAYOUT)
    assert tab["share"].between(0, 1).all()
    assert set(tab["lens"]) == set(LENSES)
    assert tab.loc[tab["lens"] == "logit", "unrolled_index"].tolist() == list(range(LAYOUT.n_unrolled))
    topk = tables["topk"]
    sel = topk[(topk["lens"] == "coda") & (topk["unrolled_index"] == 3)]
    expected = np.mean([npx.is_numeric(t) for t in sel["token"]])
    got = tab.loc[(tab["lens"] == "coda") & (tab["unrolled_index"] == 3), "share"].item()
    assert got == pytest.approx(expected)
    assert (tab["n_tokens"] == 5 * N_PROMPTS).all()


# ---------------------------------------------------------------- figure 3
def test_pick_block_rule():
    assert pick_block("logit", 4) == 2 and pick_block("coda", 4) == 3
    assert pick_block("tuned", 4) == 3
    assert pick_block("logit", 2) == 1 and pick_block("coda", 3) == 2 and pick_block("logit", 1) == 0


def test_intermediate_vs_final_uses_only_correct_problems(tables):
    tab = ivf.table(tables, LAYOUT)
    n_correct = sum(_correct(p) for p in range(N_PROMPTS))
    assert (tab["n"] == n_correct).all()
    assert tab["ci_high"].max() < WRONG_RANK
    assert ivf.correct_prompt_ids(tables["answers"], LAYOUT.steps) == {
        p for p in range(N_PROMPTS) if _correct(p)
    }
    assert set(tab["target"]) == {"intermediate", "final", "control", "digit_baseline"}
    # every core block position of every lens, every iteration
    assert set(zip(tab["lens"], tab["block"], strict=True)) == {
        (lens, b) for lens in LENSES for b in range(2)
    }
    assert set(tab["iteration"]) == set(range(1, LAYOUT.steps + 1))
    assert (tab["ci_low"] <= tab["median"]).all() and (tab["median"] <= tab["ci_high"]).all()
    assert tab["shown"].tolist() == [
        b == pick_block(lens, LAYOUT.core) for lens, b in zip(tab["lens"], tab["block"], strict=True)
    ]


def test_intermediate_is_min_of_spellings_and_baseline_excludes_answer_digits(tables):
    tab = ivf.table(tables, LAYOUT)
    r = tables["ranks"]
    ok = [p for p in range(N_PROMPTS) if _correct(p)]
    at = r[(r["lens"] == "coda") & (r["site"] == "core.1") & (r["iteration"] == 3) & r["prompt_id"].isin(ok)]
    inter = (
        at[at["target_kind"].isin(["intermediate", "intermediate_alt"])].groupby("prompt_id")["rank"].min()
    )
    row = tab[(tab["lens"] == "coda") & (tab["block"] == 1) & (tab["iteration"] == 3)].set_index("target")
    assert row.loc["intermediate", "median"] == pytest.approx(np.median(inter))
    base = []
    for pid in ok:
        inter_d, ans_d = _answer(pid)
        excl = {inter_d, 3 if pid == 4 else ans_d}  # pid 4 expects "-3"
        digits = at[(at["prompt_id"] == pid) & at["target_kind"].str.startswith("digit_")]
        keep = digits[~digits["target_kind"].str[-1].astype(int).isin(excl)]
        assert len(keep) == 10 - len(excl)
        base.append(keep["rank"].median())
    assert row.loc["digit_baseline", "median"] == pytest.approx(np.median(base))


def test_intermediate_vs_final_headline(tables):
    h = ivf.headline(ivf.table(tables, LAYOUT), LAYOUT)
    assert h["n_correct"] == sum(_correct(p) for p in range(N_PROMPTS))
    assert h["logit_block"] == 1 and 0 <= h["coda_iters_intermediate_above_final"] <= LAYOUT.steps


# ---------------------------------------------------------------- figures 4 and 5
def test_depth_scaling_table(tables):
    tab = ds.table(tables, LAYOUT)
    assert len(tab) == len(tables["depth"])
    assert ((tab["ci_low"] <= tab["accuracy"]) & (tab["accuracy"] <= tab["ci_high"])).all()
    assert tab["ci_low"].between(0, 1).all() and tab["ci_high"].between(0, 1).all()
    h = ds.headline(tab, LAYOUT)
    assert h["arithmetic_1dc_accuracy_T4"] == pytest.approx(14 / 20)
    assert h["arithmetic_2da_best_steps"] == 8


def test_latent_dynamics_table(tables):
    tab = dyn.table(tables, LAYOUT)
    assert set(tab["site"]) == {"core.1"}  # the last core block is followed
    it = tab[tab["part"] == "iteration"].sort_values("iteration")
    assert it["iteration"].tolist() == list(range(1, LAYOUT.steps + 1))
    assert np.isnan(it["step_norm_median"].iloc[0])  # no step into iteration 1
    s = it.dropna(subset=["step_norm_median"])
    assert (
        (s["step_norm_q25"] <= s["step_norm_median"]) & (s["step_norm_median"] <= s["step_norm_q75"])
    ).all()
    ver = tab[tab["part"] == "verdict"]
    assert ver["verdict"].tolist() == ["fixed-point", "cycle-2", "drift"]
    assert ver["count"].sum() == N_PROMPTS
    traj = tab[tab["part"] == "trajectory"]
    assert traj["prompt_id"].nunique() == dyn.MAX_TRAJECTORIES
    h = dyn.headline(tab, LAYOUT)
    assert h["verdict_fixed-point"] == 6 and h["n_trajectories"] == N_PROMPTS


# ---------------------------------------------------------------- reference data
def test_reference_ranks_shapes():
    r = load_reference_ranks()
    assert (r["rank"] >= 1).all()
    pred = r[r["target_kind"] == "predicted"]
    logit = pred[pred["lens"] == "logit"]
    assert logit["prompt_id"].nunique() == 100 and len(logit) == 100 * 68
    assert sorted(logit["unrolled_index"].unique()) == list(range(68))
    coda = pred[pred["lens"] == "coda"]
    assert (coda.groupby("prompt_id").size() == 66).all() and coda["prompt_id"].nunique() == 100
    assert set(coda["site"].str.split(".").str[0]) == {"prelude", "core"}
    for kind in ("final", "intermediate", "control"):
        k = r[r["target_kind"] == kind]
        assert k["prompt_id"].nunique() == 67
        assert (k[k["lens"] == "logit"].groupby("prompt_id").size() == 68).all()
        assert (k[k["lens"] == "coda"].groupby("prompt_id").size() == 64).all()
        assert k["prompt_id"].min() == FILTERED_ID_OFFSET


def test_reference_documented_facts():
    r = load_reference_ranks()
    pred = r[r["target_kind"] == "predicted"]
    # the model's own token is rank 1 under the logit lens after the last coda block (= the output) ...
    last = pred[(pred["lens"] == "logit") & (pred["unrolled_index"] == 67)]
    assert (last["rank"] == 1).all() and len(last) == 100
    # ... and under the coda lens at the last core block of the last iteration (it reproduces the output)
    coda_last = pred[(pred["lens"] == "coda") & (pred["iteration"] == 16) & (pred["block"] == 3)]
    assert (coda_last["rank"] == 1).all()
    # but the logit lens on that same latent is far off: the saw-tooth, 4th core block is worst
    med = (
        pred[(pred["lens"] == "logit") & (pred["site"].str.startswith("core"))]
        .groupby(["iteration", "block"])["rank"]
        .median()
        .unstack()
    )
    assert (med[3] > 10 * med[2]).all()
    assert med.loc[16, 3] > 1000
    # the correct answer (67 correctly answered problems) is rank 1 at the output; the intermediate is not
    out = r[(r["lens"] == "logit") & (r["unrolled_index"] == 67)]
    assert (out.loc[out["target_kind"] == "final", "rank"] == 1).all()
    assert (out.loc[out["target_kind"] == "intermediate", "rank"] > 1).all()


def test_reference_topk_and_answers():
    t = load_reference_topk()
    assert len(t[t["lens"] == "logit"]) == 100 * 68 * 5
    coda = t[t["lens"] == "coda"]
    assert len(coda) == 100 * 64 * 5 and set(coda["site"].str.split(".").str[0]) == {"core"}
    a = load_reference_answers()
    assert len(a) == 67 and a["correct"].all() and a["intermediate"].notna().all()
    assert a["prompt_id"].tolist() == list(range(FILTERED_ID_OFFSET, FILTERED_ID_OFFSET + 67))


def test_reference_overlay_table(tables):
    tab = ro.table(tables, LAYOUT)
    assert set(tab["model"]) == {"reference", "ours"}
    assert set(tab["panel"]) == set(ro.PANELS)
    ref_ivf = tab[(tab["model"] == "reference") & (tab["panel"] == "intermediate_vs_final")]
    assert "digit_baseline" not in set(ref_ivf["target"]) and (ref_ivf["n"] == 67).all()
    ref_rt = tab[(tab["model"] == "reference") & (tab["panel"] == "rank_trajectory")]
    assert len(ref_rt[ref_rt["lens"] == "logit"]) == 68 and len(ref_rt[ref_rt["lens"] == "coda"]) == 66
    assert set(tab["lens"]) == {"logit", "coda"}  # the reference has no tuned lens
    h = ro.headline(tab, LAYOUT)
    assert h["reference_logit_median_rank_last"] == 1 and h["reference_coda_top1_share_last"] == 1


# ---------------------------------------------------------------- rendering
def test_render_all_writes_every_figure(tables, tmp_path):
    results = render_all(tables, LAYOUT, tmp_path, "synthetic · T=4", strict=True)
    # the patching and sampler studies' figures need their own tables (tested with those studies)
    assert set(results) == set(FIGURES) - set(PATCHING_FIGURES) - {"sampler_frontier", "wavefront"}
    for name, info in results.items():
        for kind in ("png", "html", "table"):
            path = tmp_path / f"{name}.{ {'png': 'png', 'html': 'html', 'table': 'parquet'}[kind] }"
            assert str(path) == info[kind] and path.stat().st_size > 1000
        assert isinstance(info["headline"], dict) and info["headline"]
        assert len(pd.read_parquet(info["table"]))
    assert (tmp_path / "plotly.min.js").is_file()  # shared by every HTML file
    assert "plotly.min.js" in (tmp_path / "rank_trajectory.html").read_text()


def test_exit_gate_table(tables):
    tab = eg.table(tables, LAYOUT)
    assert tab["iteration"].tolist() == [1, 2, 3, 4] and (tab["n"] == N_PROMPTS).all()
    assert abs(tab["exit_prob_mean"].sum() - 1) < 1e-6 and abs(tab["threshold_exit_share"].sum() - 1) < 1e-9
    gate = tables["exit_gate"]
    first = gate[gate["exit_cdf"] >= 0.5].groupby("prompt_id")["iteration"].min()
    assert tab.set_index("iteration")["threshold_exit_share"][1] == (first == 1).mean()
    assert (tab["cdf_median"].diff().dropna() >= 0).all()  # cumulative
    h = eg.headline(tab, LAYOUT)
    assert 1 <= h["expected_exit_step"] <= 4


def test_render_all_skips_figures_without_inputs(tables, tmp_path):
    partial = {"ranks": tables["ranks"], "depth": pd.DataFrame()}
    results = render_all(partial, LAYOUT, tmp_path, "partial", reference=False, strict=True)
    assert set(results) == {"rank_trajectory"}
    # the overlay still draws (Huginn's figure-3 panels, ours marked as not recorded) without our answers
    results = render_all(partial, LAYOUT, tmp_path, "partial", only=["reference_overlay"], strict=True)
    tab = pd.read_parquet(results["reference_overlay"]["table"])
    assert set(tab.loc[tab["model"] == "ours", "panel"]) == {"rank_trajectory"}
