"""The evaluation with more than SFT and PPO: DPO / RLOO / GRPO policies found in the run (or named),
each compared with SFT on the same prompts (paired, at equal length, KL on its own samples), with what
its training cost; and the length-controlled difference on data where the right answer is known."""

import json

import numpy as np
import pytest
from ppo_tiny import make_model, make_tokenizer
from test_evaluation import fake_ppo_log, run_script
from test_rl_script import reward_model, rl_rows
from sft_helpers import write_pairs

from stackllama.errors import InputError
from stackllama.evaluation.inputs import extra_policies
from stackllama.evaluation.policies import PolicySpec
from stackllama.evaluation.statistics import length_controlled_difference, paired_comparison
from stackllama.evaluation.training_cost import training_cost


def constructed(effect: float, prompts: int = 120, samples: int = 4, seed: int = 0):
    """Scores = question difficulty + 0.05 per token + `effect` for the policy + noise; the policy writes
    10-40 tokens more than SFT, so its raw lead is mostly length."""
    rng = np.random.default_rng(seed)
    sft_len = rng.integers(20, 60, (prompts, samples)).astype(float)
    policy_len = sft_len + rng.integers(10, 40, (prompts, samples))
    question = rng.normal(0, 1, (prompts, 1))
    sft = question + 0.05 * sft_len + rng.normal(0, 0.3, (prompts, samples))
    policy = question + 0.05 * policy_len + effect + rng.normal(0, 0.3, (prompts, samples))
    return sft, policy, sft_len, policy_len


@pytest.mark.parametrize("effect", [0.0, 0.5, -0.5])
def test_length_control_recovers_the_effect_at_equal_length(effect):
    sft, policy, sft_len, policy_len = constructed(effect)
    raw = paired_comparison(sft, policy, 500)
    controlled = length_controlled_difference(sft, policy, sft_len, policy_len, 500)
    assert raw["difference"] > effect + 1.0 and raw["difference_ci"][0] > 0  # length makes every policy "better"
    low, high = controlled["difference_ci"]
    assert low < effect < high and abs(controlled["difference"] - effect) < 0.12
    assert controlled["length_slope"] == pytest.approx(0.05, abs=0.01) and controlled["pairs"] == 480
    if effect == 0.0:
        assert low < 0 < high  # no lead survives length control


def test_length_control_without_length_differences_is_the_raw_difference():
    rng = np.random.default_rng(1)
    sft, policy = rng.normal(0, 1, (30, 2)), rng.normal(0.3, 1, (30, 2))
    lengths = np.full((30, 2), 7.0)
    controlled = length_controlled_difference(sft, policy, lengths, lengths, 300)
    raw = paired_comparison(sft, policy, 300)
    assert controlled["difference"] == pytest.approx(raw["difference"]) and controlled["length_slope"] == 0.0
    assert controlled["difference_ci"] == pytest.approx(raw["difference_ci"])  # the same resampled prompts
    with pytest.raises(InputError, match="same shape"):
        length_controlled_difference(sft, policy, lengths[:10], lengths, 10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/<run>/ with sft-merged, ppo, dpo (full weights) and grpo (a LoRA adapter over sft-merged),
    each stage with its results file; no rloo."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path_factory.mktemp("run")
    tok = make_tokenizer()
    write_pairs(run / "data", rl_rows([3, 4, 5, 6, 7]), subset="evaluation")
    for folder, seed in (("sft-merged", 0), ("ppo", 1), ("dpo", 2)):
        make_model(tok, seed=seed).save_pretrained(run / folder)
        tok.save_pretrained(run / folder)
    peft = get_peft_model(make_model(tok, seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              task_type="CAUSAL_LM", init_lora_weights=False))
    peft.peft_config["default"].base_model_name_or_path = str(run / "sft-merged")
    peft.save_pretrained(run / "grpo")
    tok.save_pretrained(run / "grpo")
    reward_model(tok).save_pretrained(run / "reward")
    tok.save_pretrained(run / "reward")
    fake_ppo_log(run / "ppo" / "ppo_log.jsonl")
    (run / "sft").mkdir()
    for stage, results in (("sft", {"wall_time_s": 100.0}), ("ppo", {"wall_time_s": 200.0, "tokens_generated": 5000}),
                           ("dpo", {"wall_time_s": 50.0}), ("grpo", {"wall_time_s": 80.0, "tokens_generated": 900})):
        (run / stage / f"{stage}_results.json").write_text(json.dumps(results))
    return run


def test_extra_policies_are_the_runs_other_stages_or_named(run_dir, tmp_path):
    report = str(run_dir / "report")
    assert extra_policies(None, report) == [PolicySpec("DPO", str(run_dir / "dpo")),
                                            PolicySpec("GRPO", str(run_dir / "grpo"))]
    assert extra_policies(["none"], report) == []
    assert extra_policies(["grpo", f"mine={run_dir / 'dpo'}"], report) == [
        PolicySpec("GRPO", str(run_dir / "grpo")), PolicySpec("MINE", str(run_dir / "dpo"))]
    with pytest.raises(InputError, match=r"--compare_with rloo: no model in .*rloo"):
        extra_policies(["rloo"], report)
    with pytest.raises(InputError, match="its own name"):
        extra_policies([f"ppo={run_dir / 'dpo'}"], report)
    with pytest.raises(InputError, match="its own name"):
        extra_policies(["dpo", f"dpo={run_dir / 'dpo'}"], report)


def test_training_cost_is_read_never_guessed(run_dir, tmp_path):
    assert training_cost(str(run_dir / "sft-merged"), "sft") == {"train_wall_time_s": 100.0,
                                                                 "train_tokens_generated": 0}  # from sft/
    assert training_cost(str(run_dir / "grpo"), "grpo") == {"train_wall_time_s": 80.0, "train_tokens_generated": 900}
    assert training_cost(str(run_dir / "dpo"), "dpo")["train_tokens_generated"] == 0  # DPO samples nothing
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "ppo_results.json").write_text(json.dumps({"wall_time_s": 9.0}))  # before tokens_generated
    assert training_cost(str(tmp_path / "ppo"), "ppo") == {"train_wall_time_s": 9.0, "train_tokens_generated": None}
    assert training_cost(str(tmp_path / "elsewhere"), "mine") == {"train_wall_time_s": None,
                                                                  "train_tokens_generated": None}


def test_every_policy_is_compared_with_sft_on_the_same_prompts(run_dir):
    out = run_dir / "report"
    proc = run_script("--output_dir", str(out), "--samples_per_prompt", "2", "--output_min_length", "2",
                      "--output_max_length", "6", "--bootstrap_resamples", "100", "--batch_size", "4",
                      "--num_threads", "1", cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "evaluation_results.json").read_text())
    rows = {row["name"]: row for row in results["policies"]}
    assert list(rows) == ["SFT", "PPO", "DPO", "GRPO"]
    samples = [json.loads(line) for line in (out / "evaluation_samples.jsonl").read_text().splitlines()]
    for name, row in rows.items():
        key = name.lower()
        assert np.mean([s[f"{key}_score"] for s in samples]) == pytest.approx(row["mean_score"], abs=1e-6)
        assert all(s[f"{key}_tokens"] <= s["length_limit"] for s in samples)  # the same length limits
        assert row["tokens_evaluated"] == sum(s[f"{key}_tokens"] for s in samples)
        if name == "SFT":
            assert row["kl_from_sft"] == 0.0 and row["score_difference"] is None and row["length_controlled"] is None
            continue
        assert row["kl_from_sft"] == pytest.approx(np.mean([s[f"{key}_kl_from_sft"] for s in samples]))
        assert row["kl_from_sft"] > 0 and row["length_controlled"]["pairs"] == len(samples)
        diffs = [s[f"{key}_score"] - s["sft_score"] for s in samples]
        assert row["score_difference"] == pytest.approx(np.mean(diffs), abs=1e-6)
    # PPO's figures are the ones the SFT-vs-PPO report always had
    assert rows["PPO"]["score_difference"] == results["score_difference"]
    assert rows["PPO"]["kl_from_sft"] == results["ppo"]["kl_from_sft"]
    assert rows["SFT"]["mean_score_ci"] == results["sft"]["mean_score_ci"]
    assert (rows["PPO"]["train_wall_time_s"], rows["PPO"]["train_tokens_generated"]) == (200.0, 5000)
    assert (rows["GRPO"]["kind"], rows["GRPO"]["train_tokens_generated"]) == ("LoRA adapter", 900)
    assert results["length_control"]["method"] == "paired regression"
