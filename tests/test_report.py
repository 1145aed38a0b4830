"""The report from small fake logs (no training): plots, report.md, the verdict both ways, missing
logs, Markdown-proof sample answers, and `scripts/evaluate.py --report_only`."""

import json
import subprocess
import sys

import pytest
from sft_helpers import REPO

from stackllama.atomic import replace_dir
from stackllama.report import (
    PPO_PLOT,
    REWARD_PLOT,
    SFT_PLOT,
    LogSources,
    TrainingLogs,
    build_report,
    choose_examples,
    fenced,
    headline,
    read_ppo_log,
    verdict,
)


def trainer_state(rows):
    return json.dumps({"global_step": rows[-1]["step"], "log_history": rows})


def ppo_row(step):
    return {"env/step": step, "env/reward_mean": -1 + 0.05 * step, "env/reward_std": 0.4, "objective/kl": 0.1 * step,
            "objective/kl_coef": 0.2 - 0.001 * step, "ppo/loss/policy": -0.04, "ppo/loss/value": 0.2 / step,
            "ppo/policy/clipfrac": 0.1, "ppo/policy/entropy": 6.0 - 0.01 * step, "tokens/responses_len_mean": 30.0,
            "env/missing_eos_share": 0.9, "env/degenerate_share": 0.0,
            "samples": [{"query": "Question: q\n\nAnswer: ", "response": "a", "reward": -1.0}]}


def write_fake_run(run, steps=30):
    """runs/<run>/{sft,reward,ppo} with the logs and results files the stages write, small and made up."""
    for name in ("sft", "reward", "ppo"):
        (run / name).mkdir(parents=True, exist_ok=True)
    sft_rows = [{"step": s, "epoch": s / 40, "loss": 8 - 0.1 * s, "learning_rate": 1e-3} for s in range(2, 22, 2)]
    sft_rows.append({"step": 20, "eval_loss": 6.2, "eval_perplexity": 492.7})
    (run / "sft" / "trainer_state.json").write_text(trainer_state(sft_rows))
    (run / "sft" / "sft_results.json").write_text(json.dumps(
        {"eval_loss_before": 8.3, "eval_loss": 6.2, "perplexity_before": 4000.0, "perplexity": 492.7, "global_step": 20}))
    reward_rows = [{"step": s, "loss": 0.69 - 0.01 * s, "accuracy": 0.5 + 0.02 * s, "margin": 0.1} for s in range(1, 11)]
    (run / "reward" / "trainer_state.json").write_text(trainer_state(reward_rows))
    (run / "reward" / "reward_results.json").write_text(json.dumps(
        {"global_step": 10, "eval_before": {"accuracy": 0.55, "longer_answer_baseline": 0.73},
         "eval_after": {"accuracy": 0.66, "longer_answer_baseline": 0.73}}))
    (run / "ppo" / "ppo_log.jsonl").write_text("".join(json.dumps(ppo_row(s)) + "\n" for s in range(1, steps + 1)))
    (run / "ppo" / "ppo_results.json").write_text(json.dumps(
        {"steps": steps, "reward_first": -0.9, "reward_last": -0.3, "kl_last": 3.0, "kl_max": 3.1,
         "kl_coef_last": 0.17, "seconds_per_step": 3.8, "averaged_over_steps": 5}))
    return LogSources(run / "sft", run / "reward", run / "ppo")


def fake_results(difference=0.3, ci=(0.2, 0.4), win=0.7, win_ci=(0.6, 0.8), accuracy=0.66, baseline=0.73):
    sft_mean = -1.4
    return {
        "data_dir": "runs/x/data", "subset": "evaluation", "sft_model": "runs/x/sft-merged", "sft_model_kind": "full weights",
        "ppo_model": "runs/x/ppo", "ppo_model_kind": "LoRA adapter", "reward_model": "runs/x/reward",
        "policy_parameters": 5_261_568, "prompts": 30, "prompts_dropped": 47, "max_prompt_length": 128,
        "samples_per_prompt": 4, "responses_per_policy": 120, "output_min_length": 16, "output_max_length": 48,
        "temperature": 1.0, "seed": 0, "bootstrap_resamples": 2000,
        "sft": {"mean_score": sft_mean, "mean_score_ci": [-1.6, -1.2], "score_std": 0.7, "mean_length": 40.0,
                "eos_share": 0.1, "degenerate_share": 0.0, "kl_from_sft": 0.0, "kl_from_sft_per_token": 0.0},
        "ppo": {"mean_score": sft_mean + difference, "mean_score_ci": [-1.3, -0.9], "score_std": 0.8,
                "mean_length": 41.5, "eos_share": 0.05, "degenerate_share": 0.0, "kl_from_sft": 6.6,
                "kl_from_sft_ci": [5.9, 7.3], "kl_from_sft_per_token": 0.085},
        "score_difference": difference, "score_difference_ci": list(ci), "win_rate": win, "win_rate_ci": list(win_ci),
        "ppo_better": difference > 0, "ppo_better_significant": ci[0] > 0,
        "reward_model_accuracy": {"pairs": 109, "pairs_dropped": 195, "max_length": 512, "accuracy": accuracy,
                                  "mean_margin": 0.55, "longer_answer_baseline": baseline,
                                  "accuracy_by_gap": {"1": {"pairs": 50, "accuracy": 0.66}}},
        "timings_s": {"generation_sft": 7.5},
    }


def fake_samples():
    tricky = "```\n# not a heading\n| a | b |\n</details>\n````"  # must not break report.md
    rows = []
    for p in range(6):
        rows.append({"prompt": p, "sample": 0, "query": f"Question: Question {p}?\n\nAnswer: ",
                     "sft_response": f"SFT answer {p}", "sft_score": -1.0, "sft_tokens": 5, "sft_ended": True,
                     "sft_degenerate": False, "ppo_response": tricky if p == 5 else f"PPO answer {p}",
                     "ppo_score": -1.0 + 0.1 * p, "ppo_tokens": 7, "ppo_ended": False, "ppo_degenerate": p == 5})
    return rows


def assert_png(path):
    from PIL import Image

    assert path.is_file()
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300


# --------------------------------------------------------------------------- the report


def test_report_from_fake_logs_when_ppo_is_better(tmp_path):
    sources = write_fake_run(tmp_path / "run")
    out = tmp_path / "run" / "report"
    summary = build_report(out, fake_results(), fake_samples(), sources, run=str(tmp_path / "run"))
    for name in (SFT_PLOT, REWARD_PLOT, PPO_PLOT):
        assert_png(out / name)
        assert f"]({name})" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert summary["missing"] == []
    assert "**Yes: the PPO policy's mean reward on held-out questions exceeds the SFT policy's**" in report
    assert "difference +0.300, 95% CI [+0.200, +0.400]" in report
    assert "| mean reward-model score [95% CI] | -1.400 [-1.600, -1.200] | -1.100 [-1.300, -0.900] |" in report
    assert "| PPO win rate (ties count half) | 70.0% [60.0%, 80.0%] |" in report
    assert "6.600 [5.900, 7.300]" in report and "**66.0%**" in report and "73.0%" in report
    assert "Held-out loss 8.300 → 6.200" in report and "Training reward -0.900 → -0.300" in report
    assert "Likely reasons" not in report and "not found" not in report
    assert report.count("### ") >= 3 + 4  # three plots, four samples


def test_verdict_says_plainly_when_ppo_is_not_better(tmp_path):
    sources = write_fake_run(tmp_path / "run", steps=30)
    results = fake_results(difference=-0.1, ci=(-0.3, 0.1), win=0.45, win_ci=(0.35, 0.55), accuracy=0.70, baseline=0.73)
    text = (build_report(tmp_path / "report", results, [], sources)["verdict"])
    assert text.startswith("**No: the PPO policy's mean reward on held-out questions does not exceed the SFT policy's**")
    assert "Likely reasons" in text
    assert "barely better than a length rule: accuracy 0.700" in text  # the reward model vs its length baseline
    assert "PPO ran only 30 steps" in text and "only 30 held-out questions" in text and "tiny (5.3M" in text
    assert "rose (-0.900 → -0.300" in text
    assert text in (tmp_path / "report" / "report.md").read_text()


def test_verdict_not_shown_when_interval_includes_zero():
    results = fake_results(difference=0.05, ci=(-0.05, 0.15))
    text = verdict(results, TrainingLogs())
    assert text.startswith("**Not shown") and "includes 0" in text and "Likely reasons" in text


def test_headline_is_one_plain_line():
    assert headline(fake_results()).startswith("PPO beats SFT on held-out reward: yes; difference +0.300")
    assert ": no;" in headline(fake_results(difference=-0.1, ci=(-0.3, 0.1)))
    assert "not shown" in headline(fake_results(difference=0.1, ci=(-0.1, 0.3)))


def test_verdict_warns_of_reward_hacking():
    results = fake_results()
    results["ppo"]["degenerate_share"] = 0.4
    text = verdict(results, TrainingLogs())
    assert text.startswith("**Yes") and "Caution" in text and "reward hacking" in text


def test_missing_logs_are_named_and_the_report_still_builds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sources = LogSources.for_run(run)
    summary = build_report(run / "report", fake_results(), fake_samples(), sources)
    report = (run / "report" / "report.md").read_text()
    assert len(summary["missing"]) == 3 and not list((run / "report").glob("*.png"))
    for name in ("sft/trainer_state.json", "reward/trainer_state.json", "ppo/ppo_log.jsonl"):
        assert f"{run / name}` not found" in report
    assert "![" not in report and "## Verdict" in report


def test_only_the_ppo_log_present(tmp_path):
    sources = write_fake_run(tmp_path / "run")
    (tmp_path / "run" / "sft" / "trainer_state.json").unlink()
    summary = build_report(tmp_path / "report", None, [], sources)
    assert summary["plots"]["sft"] is None and summary["plots"]["ppo"] == PPO_PLOT
    report = (tmp_path / "report" / "report.md").read_text()
    assert "No evaluation results" in report and "SFT loss:" in report


def test_sample_answers_cannot_break_the_markdown(tmp_path):
    build_report(tmp_path, fake_results(), fake_samples(), LogSources(), num_examples=6)
    report = (tmp_path / "report.md").read_text()
    tricky = fake_samples()[5]["ppo_response"]
    assert f"`````text\n{tricky}\n`````" in report  # a fence longer than the answer's longest backtick run
    assert "\n# not a heading" not in report.replace(f"`````text\n{tricky}", "")
    assert fenced("plain") == "```text\nplain\n```"


def test_choose_examples_spans_questions_and_labels_extremes():
    rows = fake_samples() + [dict(r, sample=1) for r in fake_samples()]
    chosen = choose_examples(rows, 4, seed=1)
    assert [label for label, _ in chosen][-2:] == ["largest PPO gain", "largest PPO loss"]
    assert len({row["prompt"] for _, row in chosen}) == 4
    assert chosen == choose_examples(rows, 4, seed=1)
    assert [label for label, _ in choose_examples(rows, 2)] == ["random question"] * 2
    assert choose_examples([], 4) == []


def test_ppo_log_with_two_runs_and_a_torn_line(tmp_path):
    path = tmp_path / "ppo_log.jsonl"
    lines = [json.dumps(ppo_row(s)) for s in (1, 2, 3, 1, 2)] + ['{"env/step": 3, "env/rew']
    path.write_text("\n".join(lines) + "\n")
    rows, notes = read_ppo_log(path)
    assert [r["env/step"] for r in rows] == [1, 2]
    assert "samples" not in rows[0]
    assert any("2 runs" in n for n in notes) and any("not JSON" in n for n in notes)
    assert read_ppo_log(tmp_path / "absent.jsonl") == (None, [])


def test_replace_dir_replaces_the_old_report(tmp_path):
    final, tmp = tmp_path / "report", tmp_path / ".report.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "report.md").write_text("new")
    replace_dir(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert [p.name for p in final.iterdir()] == ["report.md"]


# --------------------------------------------------------------------------- --report_only


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_report_only_rebuilds_from_fake_logs(tmp_path):
    run = tmp_path / "run"
    write_fake_run(run)
    (run / "report").mkdir()
    (run / "report" / "evaluation_results.json").write_text(json.dumps(fake_results(difference=-0.2, ci=(-0.4, 0.0))))
    (run / "report" / "evaluation_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_samples()))
    proc = run_script("--output_dir", str(run / "report"), "--report_only", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (run / "report" / "report.md").read_text()
    assert "**No: the PPO policy's mean reward" in report and "### 4." in report
    for name in (SFT_PLOT, REWARD_PLOT, PPO_PLOT):
        assert_png(run / "report" / name)


def test_report_only_with_nothing_to_report_is_a_one_line_error(tmp_path):
    proc = run_script("--output_dir", str(tmp_path / "run" / "report"), "--report_only", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("evaluate.py: error: nothing to report")


@pytest.mark.parametrize("rows", [[], [{"step": 1}]])
def test_trainer_state_without_losses_still_plots(tmp_path, rows):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "trainer_state.json").write_text(json.dumps({"log_history": rows}))
    summary = build_report(tmp_path / "report", None, [], LogSources(sft_dir=tmp_path / "sft"))
    assert_png(tmp_path / "report" / SFT_PLOT)
    assert summary["plots"]["sft"] == SFT_PLOT
