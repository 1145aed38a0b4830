"""The RLOO and GRPO stages (`scripts/rloo.py`, `scripts/grpo.py`, `stackllama.online_rl`) on the PPO tests'
tiny fixtures: a programmatic reward is learned through the same glue as the reward model; that glue scores
what PPO's `RewardFunction` scores (EOS appended alike); the logged KL is PPO's `objective/kl`, checked
against log-probs computed here, with TRL's reference (a frozen copy, or the LoRA adapters disabled); a NaN
reward stops the step; a run killed inside a step resumes to the same weights; the scripts' errors are one
line; both run on two CPU processes and their LoRA adapters merge like an SFT adapter. Run with `-s` to see
the figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interrupt_helpers import PAUSE_IN_TRAINING_STEP, REPO, hook_env, kill_when, max_abs_diff, rank_recorder, torchrun
from interrupt_helpers import run as run_to_end
from ppo_tiny import make_model, make_tokenizer, one_thread  # noqa: F401  (fixture)
from sft_helpers import write_pairs
from test_rl_script import reward_model  # the PPO stage tests' tiny reward model

from stackllama.data.template import format_prompt
from stackllama.errors import NonFiniteError
from stackllama.online_rl import TRLReward, build_trainer
from stackllama.reward_scoring import RewardFunction

pytestmark = pytest.mark.usefixtures("one_thread")

ALGORITHMS = ("rloo", "grpo")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """runs/<run>/{data,sft,reward} as the earlier stages leave them, on the tiny fixtures (24 questions)."""
    folder = tmp_path_factory.mktemp("run")
    tok = make_tokenizer()
    rows = [{"qid": i, "question": f"w{i % 28} w{(i + 5) % 28} w{(i + 11) % 28}", "date": "2015/01/27", "metadata": [],
             "response_j": "w1 w2 w3", "response_k": "w4"} for i in range(24)]
    rows.append({**rows[0], "qid": 99, "question": " ".join(["w3"] * 40)})  # over --max_prompt_length 32: dropped
    write_pairs(folder / "data", rows, subset="rl")
    make_model(tok, seed=0).save_pretrained(folder / "sft")
    tok.save_pretrained(folder / "sft")
    reward_model(tok).save_pretrained(folder / "reward")
    tok.save_pretrained(folder / "reward")
    return folder


def config(algorithm: str, out: Path, **overrides):
    from trl import GRPOConfig, RLOOConfig

    values = dict(output_dir=str(out), per_device_train_batch_size=16, num_generations=4, max_completion_length=8,
                  beta=0.04, learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="no", report_to="none",
                  use_cpu=True, bf16=False, activation_checkpointing=False, disable_dropout=True, seed=0,
                  lr_scheduler_type="constant", disable_tqdm=True, dataloader_pin_memory=False)
    values.update(overrides)
    return (GRPOConfig if algorithm == "grpo" else RLOOConfig)(**values)


def prompts(n: int = 64):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [format_prompt(f"w{i % 28} w{(i + 3) % 28}") for i in range(n)]})


def load_sft(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "sft")


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def record_generations(trainer) -> list:
    """The (prompt ids, completion ids) of every training batch TRL samples, as its `_generate` returns them."""
    batches, generate = [], trainer._generate

    def recorded(prompts_):
        out = generate(prompts_)
        batches.append(list(zip(out[0], out[1])))
        return out

    trainer._generate = recorded
    return batches


# --------------------------------------------------------------------------- (1) it learns, through the reward glue


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_programmatic_reward_is_learned_through_the_glue(algorithm, run, tmp_path):
    """Reward = occurrences of `w7` in the answer, a `score(texts, query_ids, response_ids)` callable handed to
    `build_trainer` like the reward model; after 8 steps the policy says `w7` far more often. The first step's
    KL is exactly 0 (the policy is the reference), later ones are not."""
    tok = make_tokenizer()
    w7 = tok.convert_tokens_to_ids("w7")
    seen = []

    def count_w7(texts, query_ids, response_ids):
        seen.append((texts[0], query_ids[0], response_ids[0]))
        return [float((ids == w7).sum()) for ids in response_ids]

    trainer = build_trainer(algorithm, load_sft(run), tok, config(algorithm, tmp_path, max_steps=8), prompts(),
                            count_w7, reward_name="count_w7")

    def share():  # of w7 among 20 x 8 sampled tokens, same seed before and after
        torch.manual_seed(1)
        batch = tok([format_prompt(f"w{i} w{i + 1}") for i in range(20)], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = trainer.model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=8,
                                         pad_token_id=tok.pad_token_id)
        return (out[:, batch["input_ids"].shape[1]:] == w7).float().mean().item()

    before = share()
    trainer.train()
    after = share()
    rewards, kls = logged(trainer, "rewards/count_w7/mean"), logged(trainer, "objective/kl")
    print(f"\n{algorithm}: share of w7 {before:.3f} -> {after:.3f}; reward {rewards[0]:.2f} -> {rewards[-1]:.2f}; "
          f"KL per answer {[round(k, 3) for k in kls]}")
    assert after > max(0.3, 5 * before)
    assert rewards[-1] > rewards[0] + 1
    assert kls[0] == 0.0 and max(kls[1:]) > 0.1
    text, query, response = seen[0]
    assert text.startswith("Question: ") and "\n\nAnswer: " in text
    assert tok.decode(query) == tok.decode(tok(text.split("\n\nAnswer: ")[0] + "\n\nAnswer: ")["input_ids"])
    assert response.dtype == torch.long and 1 <= len(response) <= 8


# --------------------------------------------------------------------------- (2) the reward model scores as in PPO


def ppo_inputs(tok, questions, answers_ids):
    """What scripts/rl_ppo.py hands its reward function: query + decoded response, the query ids, the response ids."""
    queries = [format_prompt(q) for q in questions]
    query_ids = [torch.tensor(ids) for ids in tok(queries)["input_ids"]]
    texts = [q + tok.decode(r, skip_special_tokens=True) for q, r in zip(queries, answers_ids)]
    return queries, texts, query_ids


def test_the_reward_glue_scores_what_ppo_scores():
    """TRL's call `(prompts, completions, completion_ids)` reaches `RewardFunction` as PPO's call does, on the
    token-id path (word-level tokenizer) and on the text path; EOS is appended once, whether the answer ended
    with one or was cut."""
    tok = make_tokenizer()
    eos = tok.eos_token_id
    answers = [torch.tensor(ids) for ids in ([4, 9, 17], [5, 6, eos], [30, 4, 4, 8, 12], [7])]
    queries, texts, query_ids = ppo_inputs(tok, ["w1 w2", "w3", "w4 w5 w6", "w7 w8"], answers)
    completions = [tok.decode(r, skip_special_tokens=True) for r in answers]
    model = reward_model(tok)

    def fresh(**kw):
        return RewardFunction(model, tok, policy_tokenizer=tok, **kw)

    ppo = fresh()(texts, query_ids, answers)  # auto: token ids match re-encoding here, so the fast path
    glue_fn = fresh()
    glue = TRLReward(glue_fn, tok)(queries, completions, completion_ids=[r.tolist() for r in answers], extra=[0] * 4)
    assert glue == ppo
    assert glue_fn.use_fast_path is True
    assert glue == pytest.approx(fresh(fast_path="off").score_texts(texts), abs=1e-5)  # `q + a + <eos>` as text
    by_text = TRLReward(fresh(fast_path="off"), tok)(queries, completions, completion_ids=[r.tolist() for r in answers])
    assert by_text == pytest.approx(glue, abs=1e-5)
    without_eos = fresh(fast_path="off", append_eos=False).score_texts(texts)
    assert all(abs(a - b) > 1e-4 for a, b in zip(glue, without_eos))  # the score is read at the appended EOS


def test_the_reward_glue_keeps_ppos_text_path_for_bpe():
    """The project's byte-level BPE tokenizer: the prompt's trailing space merges into the answer when the
    text is re-encoded, so `auto` keeps the text pipeline (as in PPO) and the scores are the text path's."""
    from stackllama.tiny_model import train_tokenizer

    pairs = [("How do I brew cold coffee?", "brew it cold for a day."), ("Which beans?", "dark roast beans.")]
    tok = train_tokenizer([format_prompt(q) + a for q, a in pairs] * 20, vocab_size=400)
    answers = [torch.tensor(tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for _, a in pairs]
    queries, texts, query_ids = ppo_inputs(tok, [q for q, _ in pairs], answers)
    fn = RewardFunction(reward_model(tok), tok, policy_tokenizer=tok)
    reward = TRLReward(fn, tok)
    scores = reward(queries, [tok.decode(r, skip_special_tokens=True) for r in answers],
                    completion_ids=[r.tolist() for r in answers])
    assert fn.use_fast_path is False and reward.state_dict() == {"use_fast_path": False}
    assert scores == pytest.approx(fn.score_texts(texts), abs=1e-6)
    ppo = RewardFunction(reward_model(tok), tok, policy_tokenizer=tok)(texts, query_ids, answers)
    assert scores == pytest.approx(ppo, abs=1e-6)


# --------------------------------------------------------------------------- (3) PPO's KL, TRL's reference


def sequence_logps(model, pairs) -> list[float]:
    """`sum_t log p(y_t | x, y_<t)` of each (prompt ids, completion ids), one unpadded sequence at a time."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for prompt, completion in pairs:
            ids = torch.tensor([list(prompt) + list(completion)])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).sum().item())
    model.train(was_training)
    return out


@pytest.mark.parametrize("algorithm,lora", [("grpo", False), ("rloo", False), ("rloo", True)])
def test_logged_kl_is_ppos_sum_of_logratios_against_trls_reference(algorithm, lora, run, tmp_path):
    """The policy starts away from the SFT weights (noise, or a LoRA adapter with random B) and does not move
    (learning rate 0). Each step's logged `objective/kl` must be the batch mean of `sum_t log pi - log pi_ref`
    computed here against the SFT weights read from disk: for full weights TRL's frozen copy, for LoRA the
    policy with its adapters disabled. The rewards TRL logs are the reward model's scores of `prompt + completion`."""
    from peft import LoraConfig

    tok = make_tokenizer()
    policy, peft_config = load_sft(run), None
    if lora:
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                 task_type="CAUSAL_LM")
    else:
        torch.manual_seed(3)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
    fn = RewardFunction.from_pretrained(str(run / "reward"), policy_tokenizer=tok)
    trainer = build_trainer(algorithm, policy, tok, config(algorithm, tmp_path, learning_rate=0.0), prompts(), fn,
                            peft_config=peft_config)
    if lora:
        assert type(trainer.model).__name__.startswith("Peft") and trainer.ref_model is None  # adapters off = reference
    batches = record_generations(trainer)
    trainer.train()

    reference = load_sft(run)
    expected, per_token = [], []
    for pairs in batches:
        kl = [a - b for a, b in zip(sequence_logps(trainer.model, pairs), sequence_logps(reference, pairs))]
        expected.append(sum(kl) / len(kl))
        per_token.append(sum(kl) / sum(len(c) for _, c in pairs))
    got = logged(trainer, "objective/kl")
    print(f"\n{algorithm}{' LoRA' if lora else ''}: logged KL {got}, recomputed {expected}; per token "
          f"{logged(trainer, 'objective/kl_per_token')}")
    assert len(batches) == 2 and len(got) == 2
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert logged(trainer, "objective/kl_per_token") == pytest.approx(per_token, rel=1e-4, abs=1e-5)
    assert min(expected) > 0.01  # the policy and its reference do differ
    if algorithm == "rloo":  # TRL's own `kl` is the same log-ratios averaged per token
        assert logged(trainer, "kl") == pytest.approx(logged(trainer, "objective/kl_per_token"), rel=1e-5)
    # TRL's logged rewards of the last batch are the reward model's scores of prompt + completion (+ EOS)
    logs = trainer._logs
    texts = [p + c for p, c in zip(logs["prompt"], logs["completion"])]
    assert list(logs["rewards"]["reward_model"]) == pytest.approx(fn.score_texts(texts), abs=1e-5)


def test_a_nan_reward_stops_the_step_in_one_line(run, tmp_path):
    tok = make_tokenizer()
    calls = []

    def nan_on_second(texts, query_ids, response_ids):
        calls.append(1)
        return [math.nan if len(calls) == 2 and i == 3 else 1.0 for i in range(len(texts))]

    trainer = build_trainer("grpo", load_sft(run), tok, config("grpo", tmp_path, max_steps=3), prompts(), nan_on_second)
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("grpo step 2: non-finite value (NaN/inf) in the reward of 1 of 16 answers;")
    assert trainer.state.global_step == 1


# --------------------------------------------------------------------------- (4) kill and resume

def command(algorithm: str, run: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / f"{algorithm}.py"), "--config",
            str(REPO / "configs" / algorithm / "tiny.yaml"), "--data_dir", str(run / "data"), "--output_dir", str(out),
            "--model_name_or_path", str(run / "sft"), "--reward_model_name", str(run / "reward"),
            "--max_prompt_length", "32", "--max_completion_length", "6", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--disable_tqdm", "true", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_killed_inside_a_step_resumes_to_the_uninterrupted_run(algorithm, run, tmp_path):
    steps = ["--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2"]
    straight, out = tmp_path / "straight", tmp_path / algorithm
    run_to_end(command(algorithm, run, straight, *steps))
    env = hook_env(tmp_path / "hook", PAUSE_IN_TRAINING_STEP, {"HOOK_STEP": "4"})
    kill_when(command(algorithm, run, out, *steps), r"HOOK: paused inside training step 5", env=env)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / f"{algorithm}_results.json").exists()

    resumed = run_to_end(command(algorithm, run, out, *steps, "--resume_from_checkpoint", "latest"))
    assert f"resuming from {out / 'checkpoint-4'}" in resumed.stderr
    diff = max_abs_diff(out, straight)
    print(f"\n{algorithm}: killed inside step 5, resumed from checkpoint-4: max |diff| of final weights {diff:.3g}")
    assert diff == 0.0
    assert max_abs_diff(out, out / "checkpoint-4") > 1e-5  # the resumed run did train on
    a, b = (json.loads((folder / f"{algorithm}_results.json").read_text()) for folder in (straight, out))
    assert a["prompts"] == 24 and a["prompts_dropped"] == 1 and a["global_step"] == b["global_step"] == 6
    assert b["resumed_from"] == str(out / "checkpoint-4")
    for key in ("tokens_generated", "reward_first", "reward_last", "kl", "kl_per_token", "kl_max", "train_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert a["tokens_generated"] > 6 * 8  # at least one token per answer
    assert len(json.loads((out / "trainer_state.json").read_text())["log_history"]) == 7  # 6 steps + the summary


# --------------------------------------------------------------------------- (5) one-line errors


def run_main(algorithm: str, monkeypatch, *argv: str) -> str:
    """The script's `__main__` in this process: the one-line message it exits with (GRPO's default beta, 0, is
    refused: the configs set one)."""
    import importlib.util

    from trl import GRPOConfig, ModelConfig, RLOOConfig

    from stackllama.online_rl import OnlineRLScriptArguments
    from stackllama.stage import run_script

    spec = importlib.util.spec_from_file_location(f"{algorithm}_script", REPO / "scripts" / f"{algorithm}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"scripts/{algorithm}.py"])
    training_config = GRPOConfig if algorithm == "grpo" else RLOOConfig
    with pytest.raises(SystemExit) as exit_info:
        run_script(module.main, (OnlineRLScriptArguments, training_config, ModelConfig), module.__doc__,
                   args=["--beta", "0.04", *argv])
    return exit_info.value.code


def test_missing_reward_model_is_a_one_line_error_without_traceback(run, tmp_path):
    (tmp_path / "sft").symlink_to(run / "sft")
    (tmp_path / "data").symlink_to(run / "data")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "grpo.py"), "--output_dir", str(tmp_path / "grpo"),
                           "--beta", "0.04"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"grpo.py: error: no reward model in {tmp_path / 'reward'}")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_missing_inputs_and_bad_settings_are_one_line_errors(algorithm, run, tmp_path, monkeypatch):
    out = str(tmp_path / "run" / algorithm)
    no_sft = run_main(algorithm, monkeypatch, "--output_dir", out, "--data_dir", str(run / "data"),
                      "--reward_model_name", str(run / "reward"))
    assert no_sft.startswith(f"{algorithm}.py: error: no SFT model in {tmp_path / 'run' / 'sft-merged'}")
    no_data = run_main(algorithm, monkeypatch, "--output_dir", out, "--model_name_or_path", str(run / "sft"))
    assert no_data.startswith(f"{algorithm}.py: error: data folder {tmp_path / 'run' / 'data'} does not exist")
    no_beta = run_main(algorithm, monkeypatch, "--output_dir", out, "--beta", "0")
    assert no_beta.startswith(f"{algorithm}.py: error: --beta 0.0: {algorithm.upper()} here needs a KL coefficient > 0")
    for message in (no_sft, no_data, no_beta):
        assert "\n" not in message


def test_a_bad_config_key_is_the_parsers_one_line_error(tmp_path, capsys):
    """Flags and config keys are rejected by the shared parser with argparse's status 2, as in every script."""
    from trl import GRPOConfig, ModelConfig

    from stackllama.cli import parse_args
    from stackllama.online_rl import OnlineRLScriptArguments

    bad = tmp_path / "bad.yaml"
    bad.write_text("num_generations: 4\nnum_generation: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args((OnlineRLScriptArguments, GRPOConfig, ModelConfig), args=["--config", str(bad)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in error and "num_generation" in error


@pytest.mark.parametrize("name", ["tiny", "llama-7b"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_configs_parse(algorithm, name):
    """Every key of the shipped configs is a valid flag, with a KL coefficient > 0 and PPO's lengths."""
    from trl import GRPOConfig, ModelConfig, RLOOConfig

    from stackllama.cli import parse_args
    from stackllama.online_rl import OnlineRLScriptArguments, check_training_args

    training_config = GRPOConfig if algorithm == "grpo" else RLOOConfig
    extra = ["--bf16", "false"] if not torch.cuda.is_available() else []  # the 7B configs ask for bf16
    script, args, model = parse_args((OnlineRLScriptArguments, training_config, ModelConfig),
                                     args=["--config", str(REPO / "configs" / algorithm / f"{name}.yaml"), *extra])
    check_training_args(algorithm, args)
    assert args.beta > 0 and not args.use_vllm and args.disable_dropout
    assert args.output_dir.endswith(f"/{algorithm}")
    if name == "llama-7b":
        assert (args.max_completion_length, script.max_prompt_length) == (128, 512)
        assert (model.use_peft, model.load_in_8bit, model.lora_r, model.lora_alpha, model.lora_dropout) == \
            (True, True, 16, 32, 0.05)
        assert args.save_steps == 100 and args.learning_rate == 1.4e-5


# --------------------------------------------------------------------------- (6) two processes, LoRA, merge

RECORD = rank_recorder(r'''
    import trl
    import transformers

    train = transformers.Trainer.train
    batches = []

    def hooked(generate):
        def hooked_generate(self, prompts):
            out = generate(self, prompts)  # (prompt ids, completion ids, ...) in both trainers
            batches.append({"prompts": list(prompts), "tokens": sum(len(ids) for ids in out[1])})
            return out
        return hooked_generate

    def hooked_train(self, *args, **kwargs):
        RECORD.mkdir(parents=True, exist_ok=True)
        start = trainable(self.model)
        output = train(self, *args, **kwargs)
        torch.save({"start": start, "end": trainable(self.model)}, RECORD / f"weights{RANK}.pt")
        (RECORD / f"rank{RANK}.json").write_text(json.dumps({"batches": batches, "world": self.args.world_size,
                                                             "tokens_generated": self.tokens_generated}))
        return output

    for cls in (trl.GRPOTrainer, trl.RLOOTrainer):
        cls._generate = hooked(cls._generate)
    transformers.Trainer.train = hooked_train
''')


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lora_on_two_processes_and_its_adapter_merges(algorithm, run, tmp_path):
    """torchrun, 2 CPU processes: each samples answers to its own prompts, the adapters end equal on both
    ranks, the tokens are counted over both, rank 0 alone writes; the adapter merges as an SFT adapter does."""
    from stackllama.merge import merge_adapter

    out, record = tmp_path / algorithm, tmp_path / "record"
    env = hook_env(tmp_path / "hook", RECORD, {"MP_RECORD": str(record), "OMP_NUM_THREADS": "1",
                                               "TOKENIZERS_PARALLELISM": "false"})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
            "--max_steps", "2", "--save_strategy", "no"]
    output = torchrun(command(algorithm, run, out, *lora)[1:], nproc=2, env=env, timeout=240)
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights_ = [torch.load(record / f"weights{r}.pt") for r in (0, 1)]
    results = json.loads((out / f"{algorithm}_results.json").read_text())
    print(f"\n{algorithm} on 2 processes: {results['tokens_generated']} tokens, KL {results['kl']:.4f}, "
          f"|rank0 - rank1| {(weights_[0]['end'] - weights_[1]['end']).abs().max().item():.3g}")

    assert output.count(f"{algorithm.upper()} done") == 1 and "INFO [rank 1]" not in output
    assert all(r["world"] == 2 for r in ranks)
    for step in range(2):  # 8 answers a rank a step: 4 to each of 2 prompts, not the other rank's
        mine, theirs = (set(r["batches"][step]["prompts"]) for r in ranks)
        assert len(mine) == len(theirs) == 2 and mine.isdisjoint(theirs)
    assert torch.equal(weights_[0]["end"], weights_[1]["end"])
    assert (weights_[0]["end"] - weights_[0]["start"]).abs().max() > 1e-6
    tokens = sum(b["tokens"] for r in ranks for b in r["batches"])
    assert results["tokens_generated"] == ranks[0]["tokens_generated"] == ranks[1]["tokens_generated"] == tokens
    assert (record / "writes0.txt").read_text().split() == [f"{algorithm}_results.json"]
    assert not (record / "writes1.txt").exists()
    assert (out / "adapter_config.json").is_file() and (out / "trainer_state.json").is_file()

    merged = merge_adapter(out, tmp_path / f"{algorithm}-merged")
    assert merged["stage"] == algorithm and merged["task"] == "causal_lm" and merged["verified"]
    assert merged["base_model"] == str(run / "sft")
