"""The report with DPO / RLOO / GRPO beside PPO, from hand-made results and fake `trainer_state.json`
files (no training): the every-policy table, the comparison verdict (best method, length control,
runner-up, weak-evidence warnings), `comparison.png`, and old results files rendered as before."""

import copy
import hashlib

from test_report import assert_png, fake_results, fake_samples, trainer_state, write_fake_run

from stackllama.report import (
    COMPARISON_PLOT,
    LogSources,
    TrainingLogs,
    build_report,
    comparison_headline,
    comparison_verdict,
    render_report,
    verdict,
)
from stackllama.report.plots import plot_comparison
from stackllama.report.sections import policies_table


def policy(name, stage, mean, ci, diff=None, diff_ci=None, win=None, win_ci=None, kl=None, kl_ci=None, length=40.0,
           lc=None, lc_ci=None, slope=None, train_s=None, tokens=None, degenerate=0.0):
    return {"name": name, "stage": stage, "path": f"runs/x/{stage}", "kind": "full weights", "mean_score": mean,
            "mean_score_ci": list(ci), "score_std": 0.7, "mean_length": length, "eos_share": 0.1,
            "degenerate_share": degenerate, "kl_from_sft": 0.0 if stage == "sft" else kl,
            "kl_from_sft_ci": list(kl_ci) if kl_ci else None,
            "kl_from_sft_per_token": 0.0 if stage == "sft" else (kl / length if kl is not None else None),
            "score_difference": diff, "score_difference_ci": list(diff_ci) if diff_ci else None, "win_rate": win,
            "win_rate_ci": list(win_ci) if win_ci else None,
            "length_controlled": None if lc is None else {"difference": lc, "difference_ci": list(lc_ci),
                                                          "length_slope": slope, "pairs": 120},
            "generation_s": 5.0, "tokens_evaluated": int(120 * length), "train_wall_time_s": train_s,
            "train_tokens_generated": tokens}


def comparison_results(**kwargs):
    """fake_results (SFT vs PPO) plus five policies: DPO scores highest, but only by writing longer answers
    (its length-controlled interval includes 0); RLOO is the runner-up, its interval overlapping DPO's."""
    results = fake_results(**kwargs)
    results["policies"] = [
        policy("SFT", "sft", -1.4, (-1.6, -1.2), train_s=600.0, tokens=None),
        policy("PPO", "ppo", -1.1, (-1.3, -0.9), 0.3, (0.2, 0.4), 0.7, (0.6, 0.8), 6.6, (5.9, 7.3), 41.5,
               0.25, (0.1, 0.4), 0.01, train_s=3000.0, tokens=1_234_567),
        policy("DPO", "dpo", -0.8, (-1.0, -0.6), 0.6, (0.4, 0.8), 0.72, (0.62, 0.81), 9.0, (8.0, 10.0), 60.0,
               0.05, (-0.1, 0.2), 0.03, train_s=90.0, tokens=None),
        policy("RLOO", "rloo", -0.9, (-1.1, -0.7), 0.5, (0.3, 0.7), 0.68, (0.58, 0.78), 4.0, (3.5, 4.5), 42.0,
               0.4, (0.2, 0.6), 0.012, train_s=9000.0, tokens=800_000),
        policy("GRPO", "grpo", -1.3, (-1.5, -1.1), 0.1, (-0.1, 0.3), 0.52, (0.42, 0.62), None, None, 39.0,
               0.12, (-0.05, 0.3), 0.008),
    ]
    results["length_control"] = {"method": "paired regression",
                                 "description": "Intercept of score difference regressed on length difference."}
    return results


def write_new_stage_logs(run, stages=("dpo", "rloo")):
    """TRL-shaped trainer_state.json files for the new stages (a final summary row without metrics, as TRL writes)."""
    rows = {
        "dpo": [{"step": s, "loss": 0.69 - 0.02 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
                 "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.03 * s} for s in range(1, 11)],
        "rloo": [{"step": s, "reward": -1.2 + 0.02 * s, "reward_std": 0.3, "kl": 0.05 * s,
                  "completions/mean_length": 40.0, "loss": 0.01} for s in range(1, 31)],
        "grpo": [{"step": s, "reward": -1.3 + 0.01 * s, "reward_std": 0.3, "kl": 0.02 * s,
                  "completions/mean_length": 38.0, "loss": 0.0} for s in range(1, 21)],
    }
    for stage in stages:
        (run / stage).mkdir(parents=True, exist_ok=True)
        history = rows[stage] + [{"step": rows[stage][-1]["step"], "train_runtime": 12.0, "train_loss": 0.1}]
        (run / stage / "trainer_state.json").write_text(trainer_state(history))


def strong(results):
    """The same results with a good reward model and a large policy: no weak-evidence caveat applies."""
    results["reward_model_accuracy"].update(accuracy=0.80, longer_answer_baseline=0.60)
    results["policy_parameters"] = 7_000_000_000
    return results


# --------------------------------------------------------------------------- the table


def test_table_has_one_row_per_policy_with_dashes_for_nulls():
    table = policies_table(comparison_results())
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| policy")]
    assert [row.split(" | ")[0] for row in rows] == ["| SFT", "| PPO", "| DPO", "| RLOO", "| GRPO"]
    assert rows[0] == ("| SFT | -1.400 [-1.600, -1.200] | — | — | — | 0 (reference) | 0 (reference) | 40.0 "
                       "| 10.0% | 0.0% | 10.0 min | — |")
    assert rows[2] == ("| DPO | -0.800 [-1.000, -0.600] | 72.0% [62.0%, 81.0%] | 0.600 [0.400, 0.800] | "
                       "0.050 [-0.100, 0.200] | 9.000 [8.000, 10.000] | 0.1500 | 60.0 | 10.0% | 0.0% | 90 s | — |")
    assert rows[1].endswith("| 50.0 min | 1,234,567 |") and rows[3].endswith("| 2.5 h | 800,000 |")
    assert ("| GRPO | -1.300 [-1.500, -1.100] | 52.0% [42.0%, 62.0%] | 0.100 [-0.100, 0.300] | "
            "0.120 [-0.050, 0.300] | — | — |") in table
    header = table.splitlines()[0]
    assert header.count("|") == 13 and "length-controlled difference" in header


def test_report_section_explains_length_control(tmp_path):
    text = render_report(comparison_results(), [], TrainingLogs(), {"comparison": COMPARISON_PLOT})
    section = text.split("## Every policy against SFT")[1].split("## Reward model")[0]
    assert "at equal answer length" in section and "writing longer answers" in section
    assert "Intercept of score difference" not in section  # the results file's description is not echoed twice
    assert "DPO +0.0300 (120 pairs)" in section
    assert f"![Every policy: reward against KL, training curves]({COMPARISON_PLOT})" in section
    assert "- DPO policy: `runs/x/dpo` (full weights)" in text and "- PPO policy: `runs/x/ppo`" in text
    assert "- SFT policy: `runs/x/sft-merged`" in text  # the Models lines of today stay, none doubled
    assert text.count("- PPO policy:") == 1


# --------------------------------------------------------------------------- the verdict


def test_verdict_names_the_best_method_and_that_its_lead_is_length():
    text = comparison_verdict(comparison_results())
    assert text.startswith("**Best method under the reward model: DPO, whose mean reward exceeds SFT's**")
    assert "difference +0.600, 95% CI [+0.400, +0.800]" in text
    assert "Ranking by mean score: DPO -0.800, RLOO -0.900, PPO -1.100, GRPO -1.300." in text
    assert "Its lead does not survive length control: at equal answer length the difference is +0.050, 95% CI " \
           "[-0.100, +0.200]" in text
    assert "DPO's answers average 60.0 tokens against 40.0 for SFT" in text
    assert "not distinguishable from the runner-up, RLOO (mean score -0.900 [-1.100, -0.700]) at this sample " \
           "size of 30 questions" in text
    # fake_results' reward model: 66% against 73% for "the longer answer wins"; a 5.3M policy
    assert "Caution:" in text and "does no better than 'the longer answer wins'" in text
    assert "the policies are tiny (5.3M parameters)" in text


def test_verdict_when_the_lead_survives_length_control_and_stands_apart():
    results = strong(comparison_results())
    results["policies"][3].update(mean_score=-0.2, mean_score_ci=[-0.4, 0.0], score_difference=1.2,
                                  score_difference_ci=[1.0, 1.4])  # RLOO, its length-controlled CI [0.2, 0.6]
    text = comparison_verdict(results)
    assert text.startswith("**Best method under the reward model: RLOO")
    assert "Its lead survives length control: at equal answer length the difference is +0.400, 95% CI " \
           "[+0.200, +0.600]" in text
    assert "It is ahead of the runner-up, DPO (mean score -0.800 [-1.000, -0.600]): their 95% intervals do not " \
           "overlap." in text
    assert "Caution" not in text  # a good reward model and a 7B policy: nothing to warn of
    line = comparison_headline(results)
    assert line == ("best under the reward model: RLOO, +1.200 [+1.000, +1.400] vs SFT; length-controlled +0.400 "
                    "[+0.200, +0.600] (survives length control); ahead of runner-up DPO")


def test_verdict_warns_of_a_weak_reward_model_and_no_winner():
    results = strong(comparison_results())
    results["reward_model_accuracy"].update(accuracy=0.57, longer_answer_baseline=0.45)
    for p in results["policies"][1:]:
        p.update(score_difference=-0.1, score_difference_ci=[-0.3, 0.1])
    text = comparison_verdict(results)
    assert text.startswith("**No method beats SFT under the reward model; the highest-scoring, DPO, does not "
                           "exceed it**")
    assert "Controlled for length, at equal answer length" in text and "survive" not in text
    assert "the reward model is weak (57.0% accuracy on held-out pairs, chance 50%)" in text
    assert "tiny" not in text
    assert comparison_headline(results).endswith("; caution: weak evidence (see report)")


def test_verdict_flags_a_degenerate_winner():
    results = strong(comparison_results())
    results["policies"][2]["degenerate_share"] = 0.3
    assert "30.0% of DPO's answers are degenerate (against 0.0% for SFT), a sign of reward hacking" in \
        comparison_verdict(results)


# --------------------------------------------------------------------------- build_report and the plot


def test_build_report_draws_the_comparison_and_both_verdicts(tmp_path):
    run = tmp_path / "run"
    write_fake_run(run)
    write_new_stage_logs(run, ("dpo", "rloo"))  # GRPO was evaluated but its folder is gone
    results = comparison_results()
    summary = build_report(run / "report", results, fake_samples(), LogSources.for_run(run))
    report = (run / "report" / "report.md").read_text()
    assert_png(run / "report" / COMPARISON_PLOT)
    assert summary["plots"]["comparison"] == COMPARISON_PLOT
    assert summary["verdict"] == comparison_verdict(results) + "\n\n" + verdict(results, TrainingLogs.load(
        LogSources.for_run(run)))
    assert summary["verdict"] in report
    assert report.index("**Best method under the reward model: DPO") < report.index("**Yes: the PPO policy's")
    assert report.index("## Held-out comparison") < report.index("## Every policy against SFT") < \
        report.index("## Reward model")
    assert summary["missing"] == [f"GRPO training reward: `{run / 'grpo' / 'trainer_state.json'}` not found"]
    assert f"{run / 'grpo' / 'trainer_state.json'}` not found" in report
    assert summary["comparison_headline"] == (
        "best under the reward model: DPO, +0.600 [+0.400, +0.800] vs SFT; length-controlled +0.050 [-0.100, +0.200] "
        "(does not survive length control); not distinguishable from runner-up RLOO; "
        "caution: weak evidence (see report)")
    assert "verdict" not in results  # the caller's dict is not changed


def test_comparison_plot_leaves_out_stages_without_logs(tmp_path):
    from PIL import Image

    write_new_stage_logs(tmp_path, ("dpo", "rloo", "grpo"))
    logs = TrainingLogs.load(LogSources.for_run(tmp_path))
    policies = comparison_results()["policies"]
    full = plot_comparison(policies, tmp_path / "full.png", None, {s: logs.history(s) for s in ("dpo", "rloo", "grpo")})
    online_only = plot_comparison(policies, tmp_path / "online.png", None, {"rloo": logs.history("rloo")})
    scatter_only = plot_comparison(policies, tmp_path / "scatter.png")
    for path in (full, online_only, scatter_only):
        assert_png(path)
    widths = [Image.open(p).size[0] for p in (full, online_only, scatter_only)]
    assert widths[0] > widths[1] > widths[2]  # three panels, two, one


def test_logs_of_the_new_stages_are_read_and_missing_only_when_expected(tmp_path):
    run = tmp_path / "run"
    write_new_stage_logs(run, ("dpo",))
    (run / "rloo").mkdir()  # the stage's folder exists, but no trainer_state.json: missing
    sources = LogSources.for_run(run)
    assert (sources.dpo_dir, sources.rloo_dir, sources.grpo_dir) == (run / "dpo", run / "rloo", run / "grpo")
    logs = TrainingLogs.load(sources)
    assert [row.get("rewards/margins") for row in logs.history("dpo")][:2] == [0.02, 0.04]
    assert logs.history("rloo") is None and logs.history("ppo") is None
    assert any("RLOO training reward" in m for m in logs.missing)
    assert not any("GRPO" in m for m in logs.missing)  # never trained, never evaluated
    assert any("GRPO" in m for m in logs.expecting(["sft", "ppo", "grpo"]).missing)
    assert not any("GRPO" in m for m in logs.missing)  # `expecting` copies
    elsewhere = tmp_path / "my-dpo"
    elsewhere.mkdir()
    assert LogSources.for_run(run, dpo_model=str(elsewhere)).dpo_dir == elsewhere


# --------------------------------------------------------------------------- results files from before


# sha256 of report.md for tests/test_report.py's fixture (fake_results(), fake_samples(), write_fake_run), recorded
# before `policies` existed. If the report's wording changes on purpose, record the new hash.
OLD_REPORT_SHA256 = "44314771de37a97142c2c1b69ff50fbdc03655fdd28500cb03f37f5b4a9ce4a8"


def test_results_without_policies_render_as_before(tmp_path):
    sources = write_fake_run(tmp_path / "run")
    write_new_stage_logs(tmp_path / "run", ("dpo",))  # logs of a new stage change nothing without `policies`
    summary = build_report(tmp_path / "report", fake_results(), fake_samples(), LogSources.for_run(tmp_path / "run"))
    report = (tmp_path / "report" / "report.md").read_text()
    assert hashlib.sha256(report.encode()).hexdigest() == OLD_REPORT_SHA256
    assert summary["plots"]["comparison"] is None and not (tmp_path / "report" / COMPARISON_PLOT).exists()
    assert summary["comparison_headline"] is None and summary["missing"] == []
    assert summary["verdict"] == verdict(fake_results(), TrainingLogs.load(sources))


def test_sft_and_ppo_only_gets_the_table_but_no_comparison(tmp_path):
    results = comparison_results()
    results["policies"] = results["policies"][:2]
    summary = build_report(tmp_path, copy.deepcopy(results), [], LogSources())
    report = (tmp_path / "report.md").read_text()
    assert "## Every policy against SFT" in report and "| PPO | -1.100 [-1.300, -0.900] |" in report
    assert summary["plots"]["comparison"] is None and summary["comparison_headline"] is None
    assert summary["verdict"] == verdict(results, TrainingLogs()) and "Best method" not in report
