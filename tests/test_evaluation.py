"""Comparing policies: the paired statistics, the KL estimate, generation (lengths, EOS), the
shared-base adapter path, and `scripts/evaluate.py` end to end on tiny random models."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from ppo_tiny import make_model, make_tokenizer, one_thread
from sft_helpers import REPO, write_pairs
from test_rl_script import reward_model, rl_rows

from stackllama.cli import parse_args
from stackllama.evaluation import (
    EvaluateScriptArguments,
    Policy,
    PolicySpec,
    bootstrap_ci,
    generate_responses,
    kl_per_response,
    load_policies,
    paired_comparison,
    response_logprobs,
    response_stats,
    sample_lengths,
)
from stackllama.ppo.rollout_batch import StopTokens

pytestmark = pytest.mark.usefixtures(one_thread.__name__)  # the fixture, imported from ppo_tiny


# --------------------------------------------------------------------------- statistics


def test_bootstrap_interval_covers_the_truth_about_95_percent():
    """Over many synthetic experiments the 95% interval of the mean difference holds the true value
    about 95% of the time (percentile bootstrap on 40 prompts: a little under, never far off)."""
    rng = np.random.default_rng(1)
    truth, hits, runs = 0.3, 0, 200
    for r in range(runs):
        sft = rng.normal(0.0, 1.0, size=(40, 2))
        ppo = sft + rng.normal(truth, 1.0, size=(40, 2))
        low, high = paired_comparison(sft, ppo, n_resamples=500, seed=r)["difference_ci"]
        hits += low <= truth <= high
    assert 0.88 <= hits / runs <= 0.99


def test_win_rate_counts_ties_half():
    sft = [[1.0, 2.0], [3.0, 3.0], [0.0, 0.0]]
    ppo = [[2.0, 2.0], [1.0, 3.0], [0.0, 0.0]]
    out = paired_comparison(sft, ppo, n_resamples=100)
    # per prompt: (1 + 0.5) / 2, (0 + 0.5) / 2, (0.5 + 0.5) / 2
    assert out["win_rate"] == pytest.approx((0.75 + 0.25 + 0.5) / 3)
    assert out["difference"] == pytest.approx(((1 + 0) / 2 + (-2 + 0) / 2 + 0) / 3)
    assert out["prompts"] == 3 and out["pairs"] == 6
    assert out["sft_mean"] == pytest.approx(9 / 6) and out["ppo_mean"] == pytest.approx(8 / 6)


def test_clearly_better_policy_has_intervals_above_chance():
    rng = np.random.default_rng(0)
    sft = rng.normal(size=(30, 4))
    ppo = sft + 1.0 + 0.3 * rng.normal(size=(30, 4))
    out = paired_comparison(sft, ppo, n_resamples=1000)
    assert out["win_rate_ci"][0] > 0.5 and out["difference_ci"][0] > 0
    worse = paired_comparison(ppo, sft, n_resamples=1000)
    assert worse["win_rate_ci"][1] < 0.5 and worse["difference_ci"][1] < 0


def test_copies_of_a_prompt_do_not_narrow_the_interval():
    """The bootstrap resamples prompts: k identical answers per prompt are one piece of evidence, not k."""
    rng = np.random.default_rng(0)
    sft, ppo = rng.normal(size=(25, 1)), rng.normal(size=(25, 1))
    one = paired_comparison(sft, ppo, n_resamples=500, seed=3)
    copies = paired_comparison(np.repeat(sft, 8, 1), np.repeat(ppo, 8, 1), n_resamples=500, seed=3)
    assert copies["difference_ci"] == pytest.approx(one["difference_ci"])
    assert copies["win_rate_ci"] == pytest.approx(one["win_rate_ci"])


def test_bootstrap_ci_and_bad_shapes():
    assert bootstrap_ci([2.0] * 10) == (2.0, 2.0)
    low, high = bootstrap_ci(np.arange(100.0), n_resamples=500)
    assert low < 49.5 < high
    with pytest.raises(ValueError, match="same shape"):
        paired_comparison(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="no prompts"):
        paired_comparison(np.zeros((0, 1)), np.zeros((0, 1)))


def test_sample_lengths_are_reproducible_and_in_range():
    a = sample_lengths(200, 3, 7, seed=5)
    assert a == sample_lengths(200, 3, 7, seed=5) and set(a) == {3, 4, 5, 6}
    assert a != sample_lengths(200, 3, 7, seed=6)


# --------------------------------------------------------------------------- generation and truncation


def truncate_response(tokens, eos_ids, max_length=None):
    """One response cut as `generate_responses` cuts each row (`StopTokens.truncate`)."""
    return StopTokens(eos_ids).truncate(tokens[None], None if max_length is None else [max_length])[0]


def test_truncate_response_cuts_after_first_eos_and_at_the_limit():
    eos = 1
    t = torch.tensor([5, 6, 1, 7, 1, 8])
    assert truncate_response(t, [eos]).tolist() == [5, 6, 1]
    assert truncate_response(t, [eos], 2).tolist() == [5, 6]
    assert truncate_response(t, [eos], 3).tolist() == [5, 6, 1]
    assert truncate_response(torch.tensor([5, 6, 7]), [eos], 10).tolist() == [5, 6, 7]


def uniform_policy(tokenizer, name="P"):
    """A LLaMA whose LM head is zero: every next token is uniform over the vocabulary, so EOS comes early
    in some responses and never in others."""
    model = make_model(tokenizer, seed=0)
    model.lm_head.weight.data.zero_()
    return Policy(name, "memory", model, "full weights")


def test_generation_respects_each_length_and_stops_at_eos():
    tok = make_tokenizer()
    policy = uniform_policy(tok)
    queries = [torch.tensor(tok(f"w{i} w{i + 1}")["input_ids"]) for i in range(12)]
    lengths = sample_lengths(12, 5, 40, seed=0)
    responses = generate_responses(policy, queries, lengths, tok.eos_token_id, tok.pad_token_id, batch_size=5,
                                   seed=3, progress=False)
    stats = response_stats(responses, tok.batch_decode(responses, skip_special_tokens=True), tok.eos_token_id)
    assert any(stats["ended"]) and not all(stats["ended"])
    for r, limit, ended in zip(responses, lengths, stats["ended"]):
        eos_at = (r == tok.eos_token_id).nonzero().flatten().tolist()
        assert len(r) <= limit
        if ended:
            assert eos_at == [len(r) - 1]  # cut right after the first EOS
        else:
            assert eos_at == [] and len(r) == limit  # cut by its own length, not the batch's
    assert stats["length"] == [len(r) for r in responses]
    again = generate_responses(policy, queries, lengths, tok.eos_token_id, tok.pad_token_id, batch_size=5, seed=3,
                               progress=False)
    assert all(torch.equal(a, b) for a, b in zip(responses, again))  # seeded


def test_degenerate_responses_are_flagged():
    tok = make_tokenizer()
    repeated = torch.tensor([7] * 10)
    varied = torch.arange(4, 14)
    stats = response_stats([repeated, varied], ["w3 " * 10, "w0 w1 w2"], tok.eos_token_id)
    assert stats["degenerate"] == [True, False] and stats["ended"] == [False, False]


# --------------------------------------------------------------------------- KL


def hand_logprobs(model, query, response, temperature=1.0):
    """One sequence at a time, no padding: log-softmax of the logits that predict each response token."""
    ids = torch.cat([query, response])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(query) - 1: -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0]


def test_kl_equals_a_hand_computation_with_padding():
    tok = make_tokenizer()
    p, q = Policy("PPO", "m", make_model(tok, seed=0), "full"), Policy("SFT", "m", make_model(tok, seed=1), "full")
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(4, 32, (n,), generator=g) for n in (2, 5, 3, 7)]
    responses = [torch.randint(4, 32, (n,), generator=g) for n in (4, 1, 6, 3)]
    for temperature in (1.0, 0.7):
        lp = response_logprobs(p, queries, responses, tok.pad_token_id, batch_size=3, temperature=temperature)
        lq = response_logprobs(q, queries, responses, tok.pad_token_id, batch_size=3, temperature=temperature)
        kl = kl_per_response(lp, lq)
        expected = [float((hand_logprobs(p.model, a, b, temperature) - hand_logprobs(q.model, a, b, temperature)).sum())
                    for a, b in zip(queries, responses)]
        assert kl == pytest.approx(expected, abs=1e-4)
        assert [len(x) for x in lp] == [len(r) for r in responses]
    same = response_logprobs(p, queries, responses, tok.pad_token_id, batch_size=3)
    assert kl_per_response(same, response_logprobs(p, queries, responses, tok.pad_token_id, batch_size=3)) == [0.0] * 4


def test_adapter_over_the_sft_model_is_loaded_once(tmp_path):
    """A PPO LoRA adapter whose base is the SFT folder: one model, SFT = adapter disabled; an untrained
    adapter (B = 0) is the SFT policy exactly (KL 0), a trained one is not."""
    from peft import LoraConfig, get_peft_model  # slow to import: this test only

    tok = make_tokenizer()
    sft_dir, ppo_dir = tmp_path / "sft-merged", tmp_path / "ppo"
    make_model(tok, seed=0).save_pretrained(sft_dir)
    tok.save_pretrained(sft_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft = get_peft_model(make_model(tok, seed=0), config)
    peft.peft_config["default"].base_model_name_or_path = str(sft_dir)
    peft.save_pretrained(ppo_dir)
    tok.save_pretrained(ppo_dir)

    sft, ppo = load_policies([PolicySpec("SFT", str(sft_dir)), PolicySpec("PPO", str(ppo_dir))], dtype="float32",
                             device="cpu")
    assert sft.adapter_disabled and sft.model is ppo.model and ppo.kind == "LoRA adapter"
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    responses = [torch.tensor([10, 11]), torch.tensor([12, 13, 14])]

    def kl():
        return kl_per_response(response_logprobs(ppo, queries, responses, tok.pad_token_id),
                               response_logprobs(sft, queries, responses, tok.pad_token_id))

    assert kl() == [0.0, 0.0]
    with torch.no_grad():
        for name, param in ppo.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    assert all(abs(x) > 1e-4 for x in kl())


# --------------------------------------------------------------------------- the script


def fake_ppo_log(path, steps=6):
    rows = [{"env/step": s, "env/reward_mean": -1 + 0.1 * s, "env/reward_std": 0.5, "objective/kl": 0.2 * s,
             "objective/kl_coef": 0.2, "ppo/loss/policy": -0.05, "ppo/loss/value": 0.1, "ppo/policy/clipfrac": 0.1,
             "ppo/policy/entropy": 3.0, "tokens/responses_len_mean": 4.0, "env/missing_eos_share": 0.5,
             "env/degenerate_share": 0.0, "samples": [{"query": "q", "response": "r", "reward": 0.1}]}
            for s in range(1, steps + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/<run>/{data,sft-merged,ppo,reward} on the tiny fixtures; the PPO policy is another random model."""
    run = tmp_path_factory.mktemp("run")
    tok = make_tokenizer()
    write_pairs(run / "data", rl_rows([3, 4, 5, 6, 7, 40]), subset="evaluation")
    for folder, seed in (("sft-merged", 0), ("ppo", 1)):
        make_model(tok, seed=seed).save_pretrained(run / folder)
        tok.save_pretrained(run / folder)
    reward_model(tok).save_pretrained(run / "reward")
    tok.save_pretrained(run / "reward")
    fake_ppo_log(run / "ppo" / "ppo_log.jsonl")
    (run / "ppo" / "ppo_results.json").write_text(json.dumps({"max_prompt_length": 20, "steps": 6}))
    return run


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_evaluate_script_end_to_end(run_dir):
    out = run_dir / "report"
    proc = run_script("--output_dir", str(out), "--samples_per_prompt", "3", "--output_min_length", "2",
                      "--output_max_length", "6", "--bootstrap_resamples", "200", "--batch_size", "4",
                      "--num_threads", "1", cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "evaluation_results.json").read_text())
    # defaults from the run folder and the PPO run (max_prompt_length 20 drops the 40-word question)
    assert results["sft_model"] == str(run_dir / "sft-merged") and results["ppo_model"] == str(run_dir / "ppo")
    assert results["reward_model"] == str(run_dir / "reward") and results["data_dir"] == str(run_dir / "data")
    assert (results["prompts"], results["prompts_dropped"], results["max_prompt_length"]) == (5, 1, 20)
    assert results["settings_from"]["max_prompt_length"].startswith("the PPO run")
    assert results["responses_per_policy"] == 15 and results["sft_is_ppo_with_adapter_disabled"] is False
    for key in ("mean_score", "mean_score_ci", "mean_length", "eos_share", "degenerate_share", "kl_from_sft"):
        assert key in results["sft"] and key in results["ppo"]
    assert results["ppo"]["kl_from_sft"] > 0  # two different random models
    assert results["ppo_better"] == (results["score_difference"] > 0)
    assert results["reward_model_accuracy"]["pairs"] == 6 and "verdict" in results
    assert results["verdict_headline"].startswith("PPO beats SFT on held-out reward: ")
    samples = [json.loads(line) for line in (out / "evaluation_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 15 and all(2 <= s["length_limit"] < 6 for s in samples)
    assert all(s["sft_tokens"] <= s["length_limit"] and s["ppo_tokens"] <= s["length_limit"] for s in samples)
    scores = [s["ppo_score"] for s in samples]
    assert np.mean(scores) == pytest.approx(results["ppo"]["mean_score"], abs=1e-6)

    report = (out / "report.md").read_text()
    assert "## Verdict" in report and f"{results['ppo']['mean_score']:.3f}" in report
    assert "![PPO training curves](ppo_training.png)" in report
    assert "sft/trainer_state.json` not found" in report  # no SFT log in this run: said, not hidden
    with Image.open(out / "ppo_training.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert not list(run_dir.glob(".report.tmp-*"))  # the temporary folder was moved into place


def test_missing_ppo_policy_is_a_one_line_error(run_dir, tmp_path):
    for name in ("data", "sft-merged", "reward"):
        (tmp_path / name).symlink_to(run_dir / name)
    proc = run_script("--output_dir", str(tmp_path / "report"), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("evaluate.py: error: no PPO policy in")
    assert "Traceback" not in proc.stderr and not (tmp_path / "report").exists()


def test_help_and_defaults():
    """`--help` renders every flag's text (argparse %-formats it) and the defaults come from the run folder."""
    proc = run_script("--help", cwd=REPO)
    assert proc.returncode == 0 and "--samples_per_prompt" in proc.stdout and "95% confidence" in proc.stdout
    (args,) = parse_args((EvaluateScriptArguments,), args=[])
    assert args.output_dir == "runs/tiny/report" and args.sft_model is None and args.max_prompt_length is None
