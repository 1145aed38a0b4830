"""Reward modeling: the loss, the metrics, batching of pairs, the length filter, save/reload/score."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from sft_helpers import REPO, build_small_model, pair_rows, write_pairs

from stackllama.reward_modeling import (
    load_reward_model,
    pair_metrics,
    pairwise_loss,
    reward_text,
    score_ids,
    score_texts,
    tokenize_pairs,
)


def reward_rows(n_questions=12):
    """Pairs whose preferred answer says "vinegar" and the other "soap"; which one is the
    longer alternates, so neither length nor a random head tells them apart."""
    rows = pair_rows(n_questions, pairs_per_question=2)
    filler = " Then rinse it twice and let it dry on a towel overnight."
    for i, row in enumerate(rows):
        row["response_j"] = "Clean it with vinegar." + (filler if i % 2 else "")
        row["response_k"] = "Clean it with soap." + ("" if i % 2 else filler)
        row["pm_score_j"], row["pm_score_k"] = 2 + i % 3, 1  # gaps 1, 2, 3
    return rows


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A prepared-data folder with reward/evaluation pairs and a small LLaMA built from it."""
    tmp = tmp_path_factory.mktemp("reward")
    data = write_pairs(tmp / "data", reward_rows())
    write_pairs(data, reward_rows(), subset="reward")
    write_pairs(data, reward_rows(6), subset="evaluation")
    return SimpleNamespace(data=data, base=build_small_model(tmp, data), tmp=tmp)


def seq_cls(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def test_pairwise_loss_hand_computed():
    r_j, r_k = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2  # 0.813262
    assert pairwise_loss(r_j, r_k).item() == pytest.approx(expected, abs=1e-6)


def test_trl_reward_trainer_uses_the_same_loss_and_order(small):
    """The trainer we train with reads chosen (j) as the first half of the batch and
    computes -logsigmoid(r_j - r_k) on fixed scores exactly as by hand."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tokenizer = seq_cls(small.base)
    dataset = Dataset.from_dict({"chosen_ids": [[1, 2, 3]], "rejected_ids": [[1, 2]]})
    args = RewardConfig(output_dir=str(small.tmp / "trl"), report_to="none", max_length=None, use_cpu=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    fixed = torch.tensor([[2.0], [0.5], [1.0], [1.5]])  # chosen 2.0, 0.5; rejected 1.0, 1.5

    class Fixed(torch.nn.Module):
        def forward(self, **inputs):
            return SimpleNamespace(logits=fixed)

    inputs = trainer.data_collator([{"chosen_ids": [1, 2, 3], "rejected_ids": [1]},
                                    {"chosen_ids": [4], "rejected_ids": [5, 6]}])
    loss = trainer.compute_loss(Fixed(), inputs)
    assert loss.item() == pytest.approx(pairwise_loss(fixed[:2, 0], fixed[2:, 0]).item(), abs=1e-6)
    assert inputs["input_ids"][0].tolist() == [1, 2, 3] and inputs["input_ids"][2].tolist()[0] == 1


def test_pair_metrics_on_a_constructed_case():
    r_j = [3.0, 1.0, 0.0, 2.0, 5.0]
    r_k = [1.0, 2.0, 1.0, 0.0, 4.0]
    gaps = [1, 1, 2, 3, 5]
    m = pair_metrics(r_j, r_k, gaps, length_j=[10, 5, 7, 7, 1], length_k=[5, 6, 7, 3, 2])
    assert m["pairs"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["mean_margin"] == pytest.approx((2 - 1 - 1 + 2 + 1) / 5)
    assert m["accuracy_by_gap"] == {"1": {"pairs": 2, "accuracy": 0.5}, "2": {"pairs": 1, "accuracy": 0.0},
                                    "3+": {"pairs": 2, "accuracy": 1.0}}
    assert m["longer_answer_baseline"] == pytest.approx((1 + 0 + 0.5 + 1 + 0) / 5)


def test_pairs_stay_aligned_across_padding(small):
    """Batched with padding (chosen first, then rejected, as the trainer's collator does),
    every pair's scores equal the scores of each text alone, unpadded."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model, tokenizer = seq_cls(small.base)
    texts = [("short q", "yes"), ("a much longer question about grinders and kettles", "no"),
             ("mid question here", "a long long answer with many many words in it")]
    pairs = [{"chosen_ids": tokenizer(reward_text(q, a, tokenizer.eos_token))["input_ids"],
              "rejected_ids": tokenizer(reward_text(q, a + " not", tokenizer.eos_token))["input_ids"]}
             for q, a in texts]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        r_j, r_k = torch.chunk(model(**batch).logits[:, 0], 2)
        alone = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, 0]  # noqa: E731
        for i, pair in enumerate(pairs):
            assert r_j[i].item() == pytest.approx(alone(pair["chosen_ids"]).item(), abs=1e-4)
            assert r_k[i].item() == pytest.approx(alone(pair["rejected_ids"]).item(), abs=1e-4)
    # score_ids sorts by length internally but returns scores in the input order
    flat = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    torch.testing.assert_close(score_ids(model, flat, tokenizer.pad_token_id, batch_size=2),
                               torch.cat([r_j, r_k]), atol=1e-4, rtol=0)


def test_length_filter_drops_and_counts(small):
    from datasets import Dataset

    _, tokenizer = seq_cls(small.base)
    rows = reward_rows(4)
    rows[1]["response_k"] = "word " * 200
    rows[5]["response_j"] = "word " * 300
    dataset = Dataset.from_list(rows)
    lengths = [max(len(tokenizer(reward_text(r["question"], r[s], tokenizer.eos_token))["input_ids"])
                   for s in ("response_j", "response_k")) for r in rows]
    limit = sorted(lengths)[-3] if sorted(lengths)[-3] < 100 else 100
    kept, dropped = tokenize_pairs(dataset, tokenizer, max_length=limit)
    assert dropped == sum(n > limit for n in lengths) >= 2
    assert len(kept) == len(rows) - dropped
    assert all(len(ids) <= limit for ids in list(kept["chosen_ids"]) + list(kept["rejected_ids"]))
    assert kept["chosen_ids"][0][-1] == tokenizer.eos_token_id
    assert sorted(set(kept["gap"])) == [1, 2, 3]
    assert tokenize_pairs(dataset, tokenizer, max_length=None)[1] == 0


def test_saved_model_reloads_and_scores(small, tmp_path):
    """Full weights and a LoRA adapter both reload as a plain classifier and as a pipeline."""
    from peft import LoraConfig, get_peft_model
    from transformers import pipeline

    model, tokenizer = seq_cls(small.base)
    texts = ["Question: How do I clean my kettle?\n\nAnswer: Vinegar.",
             "Question: How do I clean my kettle?\n\nAnswer: Buy a new one, it is cheaper in the end."]
    expected = score_texts(model, tokenizer, texts)
    model.save_pretrained(tmp_path / "full")
    tokenizer.save_pretrained(tmp_path / "full")
    reloaded, reloaded_tok = load_reward_model(str(tmp_path / "full"))
    torch.testing.assert_close(score_texts(reloaded, reloaded_tok, texts), expected)
    scorer = pipeline("text-classification", model=str(tmp_path / "full"), function_to_apply="none")
    piped = [out["score"] for out in scorer([t + tokenizer.eos_token for t in texts])]
    torch.testing.assert_close(torch.tensor(piped), expected, atol=1e-4, rtol=0)

    lora = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        lora.base_model.model.score.modules_to_save["default"].weight.add_(0.5)  # a trained head differs
    expected_lora = score_texts(lora, tokenizer, texts)
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    reloaded, reloaded_tok = load_reward_model(str(tmp_path / "adapter"))
    torch.testing.assert_close(score_texts(reloaded, reloaded_tok, texts), expected_lora)
    assert not torch.allclose(expected_lora, expected)


def test_reward_model_is_read_straight_onto_an_accelerator(small, tmp_path, monkeypatch):
    """With a GPU device the weights go there at load time (`device_map`), not through host
    memory; on CPU, or without a device, loading is as before."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = seq_cls(small.base)
    model.save_pretrained(tmp_path / "full")
    tokenizer.save_pretrained(tmp_path / "full")
    seen = []
    real = AutoModelForSequenceClassification.from_pretrained

    def spy(name, **kwargs):
        seen.append(kwargs.get("device_map"))
        kwargs.pop("device_map", None)  # no GPU here: load on CPU after recording the request
        return real(name, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", spy)
    for device in ("cuda:1", "cpu", None):
        load_reward_model(str(tmp_path / "full"), device=device)
    assert seen == [{"": torch.device("cuda:1")}, None, None]


@pytest.mark.slow
def test_script_trains_then_evaluates_alone(small, tmp_path):
    """scripts/reward_modeling.py on the small model: accuracy rises, the results file holds
    the counts, and --eval_only on the saved model gives the same accuracy."""
    out = tmp_path / "reward"
    common = [sys.executable, str(REPO / "scripts" / "reward_modeling.py"), "--data_dir", str(small.data),
              "--output_dir", str(out), "--report_to", "none", "--per_device_eval_batch_size", "8",
              "--max_length", "256", "--dataloader_pin_memory", "false"]
    train = subprocess.run(common + ["--model_name_or_path", str(small.base), "--use_peft", "false",
                                     "--num_train_epochs", "4", "--learning_rate", "3e-3",
                                     "--per_device_train_batch_size", "4", "--logging_steps", "5", "--save_strategy",
                                     "no", "--use_cpu", "true", "--merge", "true"], capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((out / "reward_results.json").read_text())
    assert results["train_pairs"] + results["train_pairs_dropped"] == 24
    assert results["eval_pairs"] + results["eval_pairs_dropped"] == 12
    assert results["eval_after"]["accuracy"] > results["eval_before"]["accuracy"]
    assert results["eval_after"]["accuracy"] >= 0.9
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    merged, merged_tok = load_reward_model(str(tmp_path / "reward-merged"))  # --merge: full weights beside it
    saved, saved_tok = load_reward_model(str(out))
    texts = ["Question: q?\n\nAnswer: Clean it with vinegar."]
    torch.testing.assert_close(score_texts(merged, merged_tok, texts), score_texts(saved, saved_tok, texts))

    alone = subprocess.run(common + ["--eval_only", "true"], capture_output=True, text=True, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert f"accuracy {results['eval_after']['accuracy']:.3f}" in alone.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_script_trains_on_a_quantized_base_without_bf16(small, tmp_path, bits):
    """LoRA on an 8/4-bit base in fp32 (the CPU default): TRL casts the trainable parameters to
    bf16 on a quantized base, and the fully trained score head must be cast back, or the first
    step fails on mixed dtypes."""
    out = tmp_path / "reward"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reward_modeling.py"), "--data_dir", str(small.data),
         "--output_dir", str(out), "--model_name_or_path", str(small.base), "--report_to", "none",
         "--use_peft", "true", f"--load_in_{bits}bit", "true", "--bf16", "false", "--max_steps", "2",
         "--per_device_train_batch_size", "4", "--max_length", "256", "--save_strategy", "no",
         "--use_cpu", "true", "--merge", "false", "--dataloader_pin_memory", "false"],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "reward_results.json").read_text())
    assert results["global_step"] == 2 and math.isfinite(results["train_loss"])
    assert (out / "adapter_config.json").is_file()


def test_missing_sft_model_is_a_clear_error(tmp_path):
    out = tmp_path / "run" / "reward"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reward_modeling.py"), "--data_dir",
                           str(tmp_path), "--output_dir", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no SFT model in" in proc.stderr and "--model_name_or_path" in proc.stderr


def test_lora_reward_model_merges_to_the_same_scores(small, tmp_path):
    """A SEQ_CLS adapter (LoRA + trained score head) merged into its base scores as before."""
    from peft import LoraConfig, get_peft_model

    from stackllama.merge import merge_lora

    model, tokenizer = seq_cls(small.base)
    lora = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05)
    texts = ["Question: a kettle?\n\nAnswer: vinegar", "Question: grinder?\n\nAnswer: brush it out, twice a week"]
    expected = score_texts(lora, tokenizer, texts)
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    merge_lora(tmp_path / "adapter", tmp_path / "merged", task="seq_cls")
    merged, merged_tok = load_reward_model(str(tmp_path / "merged"))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert merged.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(score_texts(merged, merged_tok, texts), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "llama-7b"])
def test_shipped_configs_parse(name):
    """Every key of configs/reward/*.yaml is a known flag; the 7B one holds the recipe."""
    from trl import ModelConfig, RewardConfig

    from stackllama.cli import parse_args
    from stackllama.reward_modeling import RewardScriptArguments

    extra = ["--bf16", "false"] if not torch.cuda.is_available() else []  # the 7B config asks for bf16
    script, train, model = parse_args((RewardScriptArguments, RewardConfig, ModelConfig),
                                      ["--config", str(REPO / "configs" / "reward" / f"{name}.yaml")] + extra)
    if name == "llama-7b":
        assert (train.per_device_train_batch_size, train.learning_rate, train.num_train_epochs) == (4, 2e-5, 1)
        assert (script.max_train_pairs, script.max_eval_pairs, train.max_length) == (100_000, 50_000, 512)
        assert (model.use_peft, model.lora_r, model.lora_alpha, model.lora_dropout) == (True, 8, 32, 0.1)
        assert train.disable_dropout is False  # else TRL turns the LoRA dropout off
    else:
        assert model.use_peft is False and train.max_length == 512
