"""DPO (scripts/dpo.py, stackllama/dpo.py): training moves the implicit reward the right way, the held-out
evaluation computes TRL's implicit reward, resume after SIGKILL equals the uninterrupted run, two
processes train one model, bad input is a one-line error.

The pairs are built so that the answer is known: every preferred answer is the word "vinegar"
repeated, every other one "water" repeated (one token each), and which one is longer alternates, so that the
"longer answer wins" baseline is 0.5 and only the words tell the answers apart. Run with `-s` to
see the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from interrupt_helpers import PAUSE_IN_TRAINING_STEP, REPO, hook_env, kill_when, max_abs_diff, rank_recorder, torchrun
from interrupt_helpers import run as run_to_end
from safetensors.torch import load_file
from sft_helpers import build_small_model, pair_rows, write_pairs

from stackllama.dpo import (
    DPOScriptArguments,
    completion_logps,
    evaluate_pairs,
    implicit_reward_metrics,
    tokenize_pairs,
    tokenize_preference,
    to_preference,
)
from stackllama.hf_trainer import STAGE_STATE
from stackllama.resume import checkpoints

SCRIPT = REPO / "scripts" / "dpo.py"


def dpo_rows(n_questions: int, first_qid: int = 0) -> list[dict]:
    rows = pair_rows(n_questions, pairs_per_question=2)
    for i, row in enumerate(rows):
        row["qid"] += first_qid
        long, short = 5, 3
        row["response_j"] = " ".join(["vinegar"] * (long if i % 2 else short))
        row["response_k"] = " ".join(["water"] * (short if i % 2 else long))
        row["pm_score_j"], row["pm_score_k"] = 2 + i % 3, 1  # gaps 1, 2, 3
    return rows


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Prepared data (finetune for the tokenizer, rl to train on, evaluation held out) and a small LLaMA."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = write_pairs(tmp / "data", pair_rows(8))
    write_pairs(data, dpo_rows(8), subset="rl")  # 16 pairs
    write_pairs(data, dpo_rows(4, first_qid=100), subset="evaluation")  # 8 pairs, other questions
    return SimpleNamespace(tmp=tmp, data=data, base=build_small_model(tmp, data))


def args_for(small, out: Path, *extra: str) -> list[str]:
    """Full training of the small model: 16 pairs in batches of 4, 6 steps, a checkpoint every 2 (2 kept)."""
    return ["--config", str(REPO / "configs" / "dpo" / "tiny.yaml"), "--data_dir", str(small.data),
            "--output_dir", str(out), "--model_name_or_path", str(small.base), "--max_length", "128",
            "--max_prompt_length", "64", "--max_eval_pairs", "8", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--warmup_steps", "0",
            "--max_steps", "6", "--logging_steps", "1", "--save_steps", "2", "--save_total_limit", "2",
            "--disable_tqdm", "true", *extra]


def command(small, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *args_for(small, out, *extra)]


@pytest.fixture(scope="module")
def uninterrupted(small):
    out = small.tmp / "dpo-uninterrupted"
    run_to_end(command(small, out))
    return out


def results_of(folder: Path) -> dict:
    return json.loads((folder / "dpo_results.json").read_text())


# ----------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_dpo_moves_the_implicit_reward_towards_the_chosen_answers(small, uninterrupted):
    results = results_of(uninterrupted)
    for key in ("base_model", "data_dir", "train_pairs", "eval_pairs", "global_step", "train_loss",
                "train_runtime_s", "wall_time_s", "eval_before", "eval_after"):
        assert key in results, key
    assert results["tokens_generated"] == 0 and results["global_step"] == 6
    assert (results["train_pairs"], results["eval_pairs"], results["base_model"]) == (16, 8, str(small.base))

    # On the training batches: TRL's logged margin starts at 0 (policy = reference) and grows
    logs = [e for e in json.loads((uninterrupted / "trainer_state.json").read_text())["log_history"]
            if "rewards/margins" in e]
    margins = [e["rewards/margins"] for e in logs]
    print(f"\ntraining margins by step: {[round(m, 3) for m in margins]}")
    assert margins[0] == 0 and margins[-1] > 0.1 and logs[-1]["rewards/accuracies"] == 1

    # Held out: every reward 0 before (the policy is its reference), chosen above rejected after
    before, after = results["eval_before"], results["eval_after"]
    print(f"held out: accuracy {before['accuracy']} -> {after['accuracy']}, margin {after['mean_margin']:.3f}, "
          f"length baseline {after['longer_answer_baseline']}")
    assert (before["accuracy"], before["ties"], before["mean_margin"]) == (0, 1, 0)
    assert after["accuracy"] == 1 and after["mean_margin"] > 0.1 and after["ties"] == 0
    assert after["rewards_chosen"] > 0 > after["rewards_rejected"]
    assert after["longer_answer_baseline"] == 0.5
    assert (uninterrupted / "model.safetensors").is_file() and "dpo" in (uninterrupted / "README.md").read_text()

    # --eval_only on the saved model (full weights: the reference is the recorded base) gives the same figures
    from trl import DPOConfig, ModelConfig

    from stackllama.cli import parse_args

    script = load_script()
    alone = script.main(*parse_args((DPOScriptArguments, DPOConfig, ModelConfig),
                                    args=args_for(small, uninterrupted, "--eval_only", "true",
                                                  "--model_name_or_path", str(uninterrupted))))
    assert alone["eval_after"]["accuracy"] == after["accuracy"]
    assert alone["eval_after"]["mean_margin"] == pytest.approx(after["mean_margin"], rel=1e-5)


def test_lora_on_a_4bit_base_trains_after_the_evaluation_before_training(small, tmp_path):
    """On CPU, bitsandbytes switched a 4-bit layer to a kernel without input gradients at its first
    eval-mode call (the evaluation before training): the adapter then never moved (grad norm 0)."""
    pytest.importorskip("bitsandbytes", reason="pip install 'stackllama[bitsandbytes]'")
    from trl import DPOConfig, ModelConfig

    from stackllama.cli import parse_args

    out = tmp_path / "dpo"
    results = load_script().main(*parse_args((DPOScriptArguments, DPOConfig, ModelConfig), args=args_for(
        small, out, "--use_peft", "true", "--load_in_4bit", "true", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2", "--learning_rate", "1e-2",
        "--save_strategy", "no")))
    moved = max(v.abs().max().item() for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k)
    print(f"\n4-bit base: LoRA B moved by up to {moved:.3g}, held-out margin {results['eval_after']['mean_margin']:.3f}")
    assert moved > 1e-4 and results["eval_after"]["mean_margin"] > 0


@pytest.mark.slow
def test_killed_inside_training_resumes_to_the_same_weights(small, uninterrupted, tmp_path):
    out = tmp_path / "dpo"
    kill_when(command(small, out), r"HOOK: paused inside training step 5",
              env=hook_env(tmp_path / "hook", PAUSE_IN_TRAINING_STEP, {"HOOK_STEP": "4"}))
    assert [p.name for p in checkpoints(out, "checkpoint")] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "dpo_results.json").exists()
    state = json.loads((out / "checkpoint-4" / STAGE_STATE).read_text())
    assert state["stage"] == "dpo" and len(state["results"]["reference_logps"][0]) == 8

    resumed = run_to_end(command(small, out, "--resume_from_checkpoint", "latest"))
    assert f"resuming from {out / 'checkpoint-4'}" in resumed.stderr
    diff = max_abs_diff(out, uninterrupted)  # the same tensors, compared
    print(f"\nkilled inside step 5, resumed from checkpoint-4: max |diff| of the final weights {diff:.3g}")
    assert diff == 0
    assert max_abs_diff(out, out / "checkpoint-4") > 1e-4  # the resumed run did train on
    ra, rb = results_of(out), results_of(uninterrupted)
    timings = ("train_runtime_s", "wall_time_s", "train_pairs_per_second", "train_tokens_per_second")
    assert {k: v for k, v in ra.items() if k not in timings} == {k: v for k, v in rb.items() if k not in timings}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_a_bad_config_key_and_a_missing_sft_model_are_one_line_errors(small, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((REPO / "configs" / "dpo" / "tiny.yaml").read_text() + "betaa: 0.2\n")
    bad_key = subprocess.run([sys.executable, str(SCRIPT), "--config", str(config)], cwd=tmp_path,
                             capture_output=True, text=True)
    assert bad_key.returncode == 2 and "Traceback" not in bad_key.stderr  # argparse's usage error, as every script
    assert [line for line in bad_key.stderr.splitlines() if "error:" in line] == [
        line for line in bad_key.stderr.splitlines() if "--betaa" in line]

    no_model = subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(small.data), "--output_dir",
                               str(tmp_path / "run" / "dpo")], cwd=tmp_path, capture_output=True, text=True)
    errors = [line for line in no_model.stderr.splitlines() if "error:" in line]
    assert no_model.returncode == 1 and "Traceback" not in no_model.stderr and len(errors) == 1
    assert "no SFT model in" in errors[0] and "--model_name_or_path" in errors[0]


def test_missing_data_and_unknown_subset_are_one_line_errors(small, tmp_path):
    from trl import DPOConfig, ModelConfig

    from stackllama.cli import parse_args
    from stackllama.errors import InputError, MissingInputError

    script = load_script()

    def main(*argv):
        return script.main(*parse_args((DPOScriptArguments, DPOConfig, ModelConfig), args=list(argv)))

    with pytest.raises(MissingInputError) as error:  # no --data_dir: <run>/data, which is not there
        main("--output_dir", str(tmp_path / "run" / "dpo"), "--model_name_or_path", str(small.base))
    assert f"data folder {tmp_path / 'run' / 'data'} does not exist" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="^unknown subset 'rll'"):
        main("--output_dir", str(tmp_path / "dpo"), "--data_dir", str(small.data),
             "--model_name_or_path", str(small.base), "--eval_subset", "rll")


# ----------------------------------------------------------------------------- the held-out evaluation


def test_implicit_reward_metrics_on_a_constructed_case():
    policy = ([-10.0, -20.0, -5.0, -8.0], [-12.0, -18.0, -5.0, -9.0])
    reference = ([-11.0, -20.0, -6.0, -8.0], [-11.0, -20.0, -6.0, -8.0])
    # rewards (beta 0.5): chosen 0.5, 0, 0.5, 0; rejected -0.5, 1, 0.5, -0.5
    m = implicit_reward_metrics(policy, reference, beta=0.5, gaps=[1, 2, 3, 1], length_j=[9, 3, 4, 4],
                                length_k=[5, 6, 4, 8])
    assert m["pairs"] == 4
    assert m["accuracy"] == pytest.approx(2 / 4)  # pairs 1 and 4; pair 3 is a tie
    assert m["ties"] == pytest.approx(1 / 4)
    assert m["mean_margin"] == pytest.approx((1 - 1 + 0 + 0.5) / 4)
    assert (m["rewards_chosen"], m["rewards_rejected"]) == (pytest.approx(0.25), pytest.approx(0.125))
    assert m["accuracy_by_gap"] == {"1": {"pairs": 2, "accuracy": 1.0}, "2": {"pairs": 1, "accuracy": 0.0},
                                    "3+": {"pairs": 1, "accuracy": 0.0}}
    assert m["longer_answer_baseline"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert m["likelihood_accuracy"] == pytest.approx(2 / 4)  # the policy alone: pairs 1 and 4


def test_evaluation_reads_the_pairs_and_computes_trls_implicit_reward(small, tmp_path):
    """On a policy moved away from its reference: our tokenization is TRL's, our log-probs are a
    token-by-token sum, and our rewards are those TRL's loss logs (rewards/chosen, /rejected, /margins)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stackllama.dpo import build_trainer

    tokenizer = AutoTokenizer.from_pretrained(small.base)
    reference = AutoModelForCausalLM.from_pretrained(small.base).eval()
    policy = AutoModelForCausalLM.from_pretrained(small.base)
    torch.manual_seed(1)  # a perturbation under which the policy prefers some rejected answers too
    with torch.no_grad():
        policy.lm_head.weight.add_(0.1 * torch.randn_like(policy.lm_head.weight))
    rows = dpo_rows(2)
    rows[1]["response_k"] = "A much longer answer about soap, with more words in it than the others."
    pairs, dropped = tokenize_pairs(Dataset.from_list(rows), tokenizer, max_length=128)
    assert dropped == 0 and list(pairs["gap"]) == [1, 2, 3, 1]

    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.3,
                     activation_checkpointing=False, max_length=None)
    trainer = build_trainer(policy, tokenizer, args, pairs)  # full weights: TRL loads the reference from the base
    texts = Dataset.from_list([to_preference(r) for r in rows])
    trl_ids = DPOTrainer._prepare_dataset(trainer, texts, tokenizer, args, "check")
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert list(trl_ids[key]) == list(pairs[key]), key
    assert pairs["chosen_ids"][0][-1] == tokenizer.eos_token_id

    # log-probs: one sequence at a time, no padding, token by token
    ours = completion_logps(policy, pairs, tokenizer.pad_token_id, batch_size=3)
    row = pairs[1]
    ids = torch.tensor([row["prompt_ids"] + row["rejected_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)
    start = len(row["prompt_ids"])
    by_hand = sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
    assert ours[1][1].item() == pytest.approx(by_hand, abs=1e-4)

    # the implicit reward TRL trains on, on the same batch
    ref = completion_logps(reference, pairs, tokenizer.pad_token_id)
    metrics = evaluate_pairs(policy, pairs, ref, beta=0.3, pad_token_id=tokenizer.pad_token_id)
    batch = trainer.data_collator([{k: pairs[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                   for i in range(len(pairs))])
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    print(f"\nours: margin {metrics['mean_margin']:.5f}, accuracy {metrics['accuracy']}; "
          f"TRL: {logged['rewards/margins']:.5f}, {logged['rewards/accuracies']}")
    assert metrics["mean_margin"] == pytest.approx(logged["rewards/margins"], abs=1e-4)
    assert metrics["rewards_chosen"] == pytest.approx(logged["rewards/chosen"], abs=1e-4)
    assert metrics["rewards_rejected"] == pytest.approx(logged["rewards/rejected"], abs=1e-4)
    assert metrics["accuracy"] == logged["rewards/accuracies"] and 0 < metrics["accuracy"] < 1
    assert metrics["longer_answer_baseline"] == pytest.approx(1 / 4)  # only the last pair's chosen is longer


def test_too_long_pairs_are_dropped_and_counted(small):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small.base)
    rows = dpo_rows(2)
    rows[0]["response_k"] = "soap " * 80  # a long answer
    rows[3]["question"] = "why " * 80  # a long prompt
    pairs = Dataset.from_list(rows)
    ids = [tokenize_preference(**to_preference(r), tokenizer=tokenizer) for r in rows]
    total = [len(x["prompt_ids"]) + max(len(x["chosen_ids"]), len(x["rejected_ids"])) for x in ids]
    prompts = [len(x["prompt_ids"]) for x in ids]
    max_length, max_prompt = sorted(total)[1], sorted(prompts)[-2]  # 2nd shortest pair, 2nd longest prompt
    kept, dropped = tokenize_pairs(pairs, tokenizer, max_length=max_length)
    assert dropped == 2 and [len(p) + max(len(c), len(r)) for p, c, r in
                             zip(kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"])] == total[1:3]
    kept, dropped = tokenize_pairs(pairs, tokenizer, max_length=None, max_prompt_length=max_prompt)
    assert dropped == 1 and max(len(p) for p in kept["prompt_ids"]) == max_prompt
    chars = [len(to_preference(r)["prompt"]) + max(len(r["response_j"]), len(r["response_k"])) for r in rows]
    assert tokenize_pairs(pairs, tokenizer, None, None, max_pair_chars=sorted(chars)[1])[1] == 2
    assert tokenize_pairs(pairs, tokenizer, None)[1] == 0


# ----------------------------------------------------------------------------- two processes, LoRA, merge


MP_HOOK = rank_recorder(r'''
    import transformers

    train, training_step = transformers.Trainer.train, transformers.Trainer.training_step
    batches = []

    def hooked_training_step(self, model, inputs, *args, **kwargs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batches.append([row[m.bool()].tolist() for row, m in zip(ids, mask)][: len(ids) // 2])  # chosen rows
        return training_step(self, model, inputs, *args, **kwargs)

    def hooked_train(self, *args, **kwargs):
        RECORD.mkdir(parents=True, exist_ok=True)
        torch.save(trainable(self.model), RECORD / f"start{RANK}.pt")
        output = train(self, *args, **kwargs)
        torch.save(trainable(self.model), RECORD / f"end{RANK}.pt")
        info = {"world_size": self.args.world_size, "wrapped": type(self.model_wrapped).__name__,
                "global_step": self.state.global_step, "batches": batches}
        (RECORD / f"rank{RANK}.json").write_text(json.dumps(info))
        return output

    transformers.Trainer.train = hooked_train
    transformers.Trainer.training_step = hooked_training_step
''')


@pytest.mark.slow
def test_two_processes_train_one_lora_policy_and_merge_it(small, tmp_path):
    """torchrun, 2 CPU processes: LoRA (reference: the adapter disabled), 2 pairs per process and step,
    3 steps; the same weights on both ranks from different rows, files written once, and --merge
    folds the DPO adapter into full weights named as the DPO stage's."""
    out, record = tmp_path / "dpo", tmp_path / "record"
    env = hook_env(tmp_path / "hook", MP_HOOK, {"MP_RECORD": str(record), "OMP_NUM_THREADS": "1",
                                                "TOKENIZERS_PARALLELISM": "false"})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    output = torchrun([str(SCRIPT), *args_for(small, out, "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
                                              "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "3",
                                              "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
                                              "--save_strategy", "no", "--merge", "true")],
                      nproc=2, env=env, timeout=240)
    assert output.count("DPO done") == 1 and "INFO [rank 1]" not in output

    infos = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    start, end = ([torch.load(record / f"{when}{r}.pt") for r in (0, 1)] for when in ("start", "end"))
    assert all(i["world_size"] == 2 and i["wrapped"] == "DistributedDataParallel" and i["global_step"] == 3
               for i in infos)
    assert torch.equal(start[0], start[1]) and torch.equal(end[0], end[1])
    assert (end[0] - start[0]).abs().max() > 1e-4
    for a, b in zip(infos[0]["batches"], infos[1]["batches"]):
        assert len(a) == len(b) == 2 and {tuple(r) for r in a}.isdisjoint({tuple(r) for r in b})
    assert [(record / f"writes{r}.txt").read_text().split() if (record / f"writes{r}.txt").exists() else []
            for r in (0, 1)] == [["merge_results.json", "dpo_results.json"], []]  # by rank 0, the results last

    results = results_of(out)
    assert results["use_peft"] and results["eval_after"]["mean_margin"] > 0
    assert (out / "adapter_model.safetensors").is_file()
    merged = json.loads((tmp_path / "dpo-merged" / "merge_results.json").read_text())
    assert (merged["stage"], merged["task"], merged["verified"]) == ("dpo", "causal_lm", True)


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
