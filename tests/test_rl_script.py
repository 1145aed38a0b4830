"""The PPO stage's script: configs, query filtering, the reward function (pipeline == fast
path, baseline subtracted), and a short end-to-end run that saves a reloadable policy."""

import json
import subprocess
import sys

import pytest
import torch
from ppo_tiny import make_model, make_tokenizer, one_thread  # noqa: F401  (fixture)
from sft_helpers import REPO, write_pairs

from stackllama.ppo.recipe import RLScriptArguments, build_query_dataset
from stackllama.reward_scoring import RewardFunction, same_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(*argv):
    from trl import ModelConfig

    from stackllama.cli import parse_args
    from stackllama.ppo import PPOConfig

    return parse_args((RLScriptArguments, PPOConfig, ModelConfig), args=list(argv))


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl_ppo_script", REPO / "scripts" / "rl_ppo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rl_rows(lengths):
    """One pair per question; question `i` is `lengths[i]` known words (one token each)."""
    rows = []
    for i, n in enumerate(lengths):
        words = " ".join(f"w{(i + k) % 28}" for k in range(n))
        rows.append({"qid": i, "question": words, "date": "2015/01/27", "metadata": [],
                     "response_j": "w1 w2 w3", "response_k": "w4"})
    return rows


def reward_model(tokenizer, seed=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/<run>/{data,sft-merged,reward} as the earlier stages leave them, on the tiny fixtures."""
    run = tmp_path_factory.mktemp("run")
    tok = make_tokenizer()
    write_pairs(run / "data", rl_rows([3, 4, 5, 6, 7, 8, 30, 40]), subset="rl")
    policy = make_model(tok, seed=0)
    policy.save_pretrained(run / "sft-merged")
    tok.save_pretrained(run / "sft-merged")
    reward = reward_model(tok)
    reward.save_pretrained(run / "reward")
    tok.save_pretrained(run / "reward")
    return run


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["tiny", "llama-7b"])
def test_configs_parse(name):
    """Every key of the shipped configs is a valid flag (the parser rejects unknown keys)."""
    script, ppo, model = parse("--config", str(REPO / "configs" / "ppo" / f"{name}.yaml"))
    assert script.output_min_length < script.output_max_length
    assert script.reward_baseline == 0.0
    if name == "llama-7b":
        assert (ppo.learning_rate, ppo.batch_size, ppo.mini_batch_size, ppo.gradient_accumulation_steps) == (1.4e-5, 8, 1, 8)
        assert (ppo.ppo_epochs, ppo.early_stopping, ppo.target_kl, ppo.init_kl_coef) == (4, True, 0.1, 0.2)
        assert (ppo.adap_kl_ctrl, ppo.target, ppo.horizon) == (True, 6.0, 10000.0)
        assert (model.use_peft, model.load_in_8bit, model.lora_r, model.lora_alpha, model.lora_dropout) == (True, True, 16, 32, 0.05)
        assert (script.output_min_length, script.output_max_length, script.max_prompt_length) == (32, 128, 512)


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 4\nbatchsize: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        parse("--config", str(bad))
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------- queries


def test_query_dataset_drops_and_counts_long_prompts(tmp_path):
    tok = make_tokenizer()
    # "Question: <n words>\n\nAnswer: " is n + 2 tokens with the word-level tokenizer
    data = write_pairs(tmp_path / "data", rl_rows([1, 2, 3, 4, 5, 6]), subset="rl")
    dataset, dropped = build_query_dataset(str(data), tok, max_prompt_length=6)
    assert dropped == 2 and len(dataset) == 4
    row = dataset[0]
    assert row["query"].startswith("Question: ") and row["query"].endswith("\n\nAnswer: ")
    assert isinstance(row["input_ids"], torch.Tensor) and len(row["input_ids"]) == 3
    assert all(len(ids) <= 6 for ids in dataset["input_ids"])
    unique, _ = build_query_dataset(str(data), tok, max_prompt_length=None, unique_questions=True)
    assert len(unique) == 6


# --------------------------------------------------------------------------- reward function


def test_reward_pipeline_equals_fast_path():
    tok = make_tokenizer()
    fn = RewardFunction(reward_model(tok), tok, policy_tokenizer=make_tokenizer(), batch_size=3)
    assert fn.shares_tokenizer and fn.use_fast_path is None  # auto: decided on the first batch
    g = torch.Generator().manual_seed(0)
    queries = [tok(f"Question: w{i} w{i + 1}\n\nAnswer: ", return_tensors="pt")["input_ids"][0] for i in range(5)]
    responses = [torch.randint(4, 32, (n,), generator=g) for n in (1, 4, 7, 2, 9)]
    responses[1] = torch.cat([responses[1], torch.tensor([tok.eos_token_id])])  # one ended with EOS
    texts = [tok.decode(q) + " " + tok.decode(r, skip_special_tokens=True) for q, r in zip(queries, responses)]

    by_text = fn.score_texts(texts)
    by_ids = fn.score_token_ids(queries, responses)
    assert by_text == pytest.approx(by_ids, abs=1e-5)
    assert max(by_text) - min(by_text) > 1e-3  # the scores are not trivially equal
    assert fn(texts, queries, responses) == pytest.approx(by_text, abs=1e-5)
    assert fn.use_fast_path is True
    assert fn(texts) == pytest.approx(by_text, abs=1e-5)  # no ids: the text path


def test_reward_text_path_for_another_tokenizer():
    tok = make_tokenizer()
    other = make_tokenizer()
    other.add_tokens(["extra"])
    assert not same_tokenizer(tok, other)
    fn = RewardFunction(reward_model(other), other, policy_tokenizer=tok)
    assert fn.use_fast_path is False
    with pytest.raises(ValueError, match="policy's tokenizer"):
        RewardFunction(reward_model(other), other, policy_tokenizer=tok, fast_path="on")


def test_reward_fast_path_falls_back_when_bpe_reencoding_differs(caplog):
    """The project's own byte-level BPE tokenizer (the tiny model's): the query ends with a space,
    its own token when the query is encoded alone ("Answer: " + "brew") but merged into the
    next word when the text is re-encoded ("Answer:" + " brew"), as the reward model was trained.
    'auto' sees the mismatch on the first batch and keeps the text pipeline for the run."""
    import logging

    from stackllama.data.template import format_prompt
    from stackllama.tiny_model import train_tokenizer

    corpus = [format_prompt(q) + a for q, a in [("How do I brew cold coffee?", "brew it cold for a day."),
                                                  ("Which beans for espresso?", "dark roast beans, ground fine."),
                                                  ("Is tea better than coffee?", "brew both and taste them.")]] * 20
    tok = train_tokenizer(corpus, vocab_size=400)
    questions = ["How do I brew cold coffee?", "Which beans for espresso?", "Is tea better than coffee?"]
    queries = [torch.tensor(tok(format_prompt(q))["input_ids"]) for q in questions]
    responses = [torch.tensor(tok(a, add_special_tokens=False)["input_ids"])
                 for a in ("brew it cold", "dark roast", "taste them")]
    texts = [format_prompt(q) + tok.decode(r, skip_special_tokens=True) for q, r in zip(questions, responses)]
    assert tok(texts[0])["input_ids"] != torch.cat([queries[0], responses[0]]).tolist()  # the premise
    fn = RewardFunction(reward_model(tok), tok, policy_tokenizer=tok, batch_size=2)
    assert fn.shares_tokenizer and fn.use_fast_path is None
    by_text, by_ids = fn.score_texts(texts), fn.score_token_ids(queries, responses)
    assert max(abs(a - b) for a, b in zip(by_text, by_ids)) > 1e-4  # the paths read different tokens
    with caplog.at_level(logging.INFO, logger="stackllama.reward_scoring"):
        scores = fn(texts, queries, responses)
    assert fn.use_fast_path is False
    assert scores == pytest.approx(by_text, abs=1e-6)
    assert "differs from the policy's ids in 3 of 3 texts" in caplog.text
    assert fn(texts, queries, responses) == pytest.approx(by_text, abs=1e-6)  # decided once, for the run
    forced = RewardFunction(reward_model(tok), tok, policy_tokenizer=tok, fast_path="on")
    assert forced(texts, queries, responses) == pytest.approx(by_ids, abs=1e-6)


# --------------------------------------------------------------------------- the script


def test_rl_script_end_to_end(run_dir, tmp_path, monkeypatch):
    from stackllama.ppo import AutoModelForCausalLMWithValueHead
    from stackllama.ppo.speedups import sampling_loop as sampling

    sampled = []  # the recipe's settings are pure sampling: the trainer's own loop samples
    monkeypatch.setattr(sampling, "sample", lambda *a, _f=sampling.sample, **k: sampled.append(1) or _f(*a, **k))
    script = load_script()
    out = run_dir / "ppo"
    args = parse("--config", str(REPO / "configs" / "ppo" / "tiny.yaml"), "--data_dir", str(run_dir / "data"),
                 "--output_dir", str(out), "--steps", "3", "--batch_size", "4", "--mini_batch_size", "2",
                 "--generation_batch_size", "4", "--ppo_epochs", "1", "--max_prompt_length", "20",
                 "--output_min_length", "3", "--output_max_length", "6", "--reward_baseline", "0.5",
                 "--save_freq", "2", "--num_threads", "1", "--reward_fast_path", "off")
    results = script.main(*args)

    assert results["queries"] == 6 and results["queries_dropped"] == 2  # questions of 30 and 40 words
    assert results["policy"] == str(run_dir / "sft-merged") and results["reward_model"] == str(run_dir / "reward")
    rows = [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert {"objective/kl", "ppo/loss/total", "env/reward_mean", "time/ppo/total"} <= set(rows[0])
    # the logged rewards are the reward model's raw scores minus reward_baseline
    tok = make_tokenizer()
    fn = RewardFunction.from_pretrained(str(run_dir / "reward"))
    samples = rows[-1]["samples"]
    assert len(samples) == 4
    scores = fn.score_texts([s["query"] + s["response"] for s in samples])
    assert [s["reward"] for s in samples] == pytest.approx([x - 0.5 for x in scores], abs=1e-4)
    assert json.loads((out / "ppo_results.json").read_text())["steps"] == 3
    assert len(sampled) == 3
    assert results["sampling_decode"] == "eager (not on a CUDA device (cpu))"  # which decode path ran, on record

    # checkpoint every 2 steps; the final policy reloads with its value head
    assert (out / "checkpoint-2" / "value_head.safetensors").is_file() and not (out / "checkpoint-3").exists()
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(out))
    from safetensors.torch import load_file

    saved_head = load_file(str(out / "value_head.safetensors"))
    assert all(torch.equal(reloaded.v_head.state_dict()[k], v) for k, v in saved_head.items())
    ids = torch.tensor([tok("w1 w2 w3")["input_ids"]])
    logits, values = reloaded(ids)
    assert logits.shape[-1] == len(tok) and values.shape == ids.shape


def test_rl_script_missing_reward_model_is_a_one_line_error(run_dir, tmp_path):
    (tmp_path / "sft-merged").symlink_to(run_dir / "sft-merged")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "rl_ppo.py"), "--data_dir", str(run_dir / "data"),
         "--output_dir", str(tmp_path / "ppo")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("rl_ppo.py: error: no reward model in")
    assert "Traceback" not in proc.stderr


def test_tracker_config_is_scalar_only():
    """TensorBoard's hparams reject None / lists / dicts: the trainer hands trackers strings for them."""
    from stackllama.ppo import PPOConfig
    from stackllama.ppo.statistics import tracker_config

    values = tracker_config(PPOConfig(stop_token_ids=[3], tracker_kwargs={"wandb": {"name": "x"}}))
    assert all(isinstance(v, (int, float, str, bool)) for v in values.values())
    assert values["stop_token_ids"] == "[3]" and values["batch_size"] == 128
