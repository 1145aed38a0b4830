"""The SFT stage: template, packing, YAML configs, short full / 8-bit / 4-bit LoRA runs, reload."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from sft_helpers import (
    REPO,
    build_small_model,
    load_sft_script,
    parse_sft_args,
    small_run_args,
    write_pairs,
)
from trl import SFTConfig

from stackllama.data.template import format_example, format_prompt
from stackllama.modeling import MissingDependencyError, load_model, load_tokenizer
from stackllama.sft import (
    RESULTS_FILE,
    SFTScriptArguments,
    build_trainer,
    in_eval_split,
    load_sft_datasets,
    non_pad_share,
)
from stackllama.stage import configure_reporting


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = write_pairs(tmp / "data")
    return data, build_small_model(tmp, data)


@pytest.fixture
def no_stream_shutdown_sleep(monkeypatch):
    """`datasets` sleeps 5 s whenever a shuffled parquet stream ends (an arrow threading workaround)."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def sft_script():
    return load_sft_script()


def make_trainer(tmp_path, data, base, packing=True, max_length=32):
    from trl import ModelConfig

    args = SFTConfig(
        output_dir=str(tmp_path / "out"), packing=packing, packing_strategy="wrapped", max_length=max_length,
        bf16=False, activation_checkpointing=False, report_to=[], per_device_train_batch_size=4,
        dataloader_pin_memory=False,
    )
    tokenizer = load_tokenizer(str(base))
    model = load_model(ModelConfig(model_name_or_path=str(base)), tokenizer)
    train, eval_ = load_sft_datasets(SFTScriptArguments(data_dir=str(data), eval_fraction=0.25), seed=args.seed)
    return build_trainer(model, tokenizer, args, train, eval_), tokenizer, train


# ----------------------------------------------------------------------------- data


def test_texts_follow_the_shared_template_with_the_preferred_answer(setup):
    data, _ = setup
    train, eval_ = load_sft_datasets(SFTScriptArguments(data_dir=str(data), eval_fraction=0.25))
    assert train.column_names == ["text"]
    texts = set(train["text"]) | set(eval_["text"])
    expected = format_example("How do I clean my espresso number 0?\n\nIt gets dirty after a week of use.",
                              "Rinse the espresso with warm water and vinegar, then dry it. Tip 0.")
    assert expected in texts
    assert expected.startswith(format_prompt("How do I clean my espresso number 0?\n\nIt gets dirty after a week of use."))
    assert not any("Just buy a new" in text for text in texts)  # response_k is never trained on


def test_eval_split_is_by_question_and_deterministic(setup, no_stream_shutdown_sleep):
    data, _ = setup
    train, eval_ = load_sft_datasets(SFTScriptArguments(data_dir=str(data), eval_fraction=0.25))
    questions = lambda ds: {t.split("\n\nAnswer: ")[0] for t in ds["text"]}  # noqa: E731
    assert len(eval_) > 0 and len(train) > 0 and len(train) + len(eval_) == 48
    assert not questions(train) & questions(eval_)
    assert [in_eval_split(q, 0.25) for q in range(100)] == [in_eval_split(q, 0.25) for q in range(100)]
    streamed_train, streamed_eval = load_sft_datasets(
        SFTScriptArguments(data_dir=str(data), eval_fraction=0.25, streaming=True)
    )
    assert sorted(t["text"] for t in streamed_eval) == sorted(eval_["text"])
    assert sorted(t["text"] for t in streamed_train) == sorted(train["text"])


# ----------------------------------------------------------------------------- packing


def test_packing_makes_full_blocks_joined_by_eos_without_padding(setup, tmp_path):
    data, base = setup
    trainer, tokenizer, raw_train = make_trainer(tmp_path, data, base, packing=True, max_length=32)
    blocks = trainer.train_dataset["input_ids"]
    assert len(blocks) > 5 and all(len(block) == 32 for block in blocks)
    stream = [token for block in blocks for token in block]
    # The blocks are the tokenized texts (BOS text EOS), concatenated in order, the short tail dropped
    expected = [token for text in raw_train["text"] for token in tokenizer(text + tokenizer.eos_token)["input_ids"]]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 32
    assert tokenizer.pad_token_id not in stream
    bos_positions = [i for i, token in enumerate(stream) if token == tokenizer.bos_token_id and i > 0]
    assert bos_positions and all(stream[i - 1] == tokenizer.eos_token_id for i in bos_positions)

    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert bool((batch["labels"] != -100).all())  # every position is trained on, none is padding
    assert bool((batch["input_ids"] != tokenizer.pad_token_id).all())
    assert non_pad_share(batch, tokenizer.pad_token_id) == 1.0
    assert all(len(block) == 32 for block in trainer.eval_dataset["input_ids"])


def test_without_packing_batches_are_padded_and_pads_masked(setup, tmp_path):
    data, base = setup
    trainer, tokenizer, _ = make_trainer(tmp_path, data, base, packing=False, max_length=512)
    batch = next(iter(trainer.get_train_dataloader()))
    pads = batch["attention_mask"] == 0
    assert bool(pads.any()) and 0 < non_pad_share(batch, tokenizer.pad_token_id) < 1
    assert bool((batch["labels"][pads] == -100).all())
    assert bool((batch["input_ids"][pads] == tokenizer.pad_token_id).all())


# ----------------------------------------------------------------------------- configs


def test_tiny_yaml_is_the_cpu_default():
    script_args, training_args, model_args = parse_sft_args("--config", str(REPO / "configs/sft/tiny.yaml"))
    assert model_args.model_name_or_path is None and not model_args.use_peft
    assert training_args.packing and training_args.packing_strategy == "wrapped"
    assert not training_args.bf16 and not training_args.activation_checkpointing
    assert script_args.data_dir == "runs/tiny/data" and training_args.output_dir == "runs/tiny/sft"
    assert script_args.merge


def test_llama_7b_yaml_is_the_recipe():
    # bf16 is overridden from the command line because this machine has no GPU
    script_args, training_args, model_args = parse_sft_args(
        "--config", str(REPO / "configs/sft/llama-7b.yaml"), "--bf16", "false"
    )
    assert model_args.load_in_8bit and model_args.use_peft
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.05)
    assert training_args.max_length == 1024 and training_args.packing
    assert training_args.learning_rate == 1e-5 and training_args.lr_scheduler_type.value == "cosine"
    assert training_args.warmup_steps == 100 and training_args.weight_decay == 0.05
    assert training_args.per_device_train_batch_size == 4
    assert training_args.eval_steps == 1000 and training_args.save_steps == 1000
    assert training_args.activation_checkpointing and script_args.streaming


def test_yaml_values_are_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("max_length: 48\nlearning_rate: 3.0e-4\nuse_peft: true\nlora_r: 4\nbf16: false\nmerge: true\n")
    script_args, training_args, model_args = parse_sft_args("--config", str(config), "--lora_r", "8")
    assert training_args.max_length == 48 and training_args.learning_rate == 3e-4
    assert model_args.use_peft and model_args.lora_r == 8 and script_args.merge
    config.write_text("not_a_flag: 1\nbf16: false\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_sft_args("--config", str(config))
    assert exit_info.value.code == 2


def test_report_to_backends(monkeypatch, tmp_path):
    import importlib.util

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.setenv(name, "")  # records the original value, so what configure_reporting sets is undone
        monkeypatch.delenv(name)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"stackllama\[wandb\]"):
        configure_reporting(SFTConfig(output_dir="x", report_to=["wandb"], bf16=False, activation_checkpointing=False))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    configure_reporting(SFTConfig(output_dir=str(tmp_path), report_to=["wandb"], bf16=False, activation_checkpointing=False))
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
    configure_reporting(SFTConfig(output_dir="x", report_to=["tensorboard"], bf16=False, activation_checkpointing=False))  # installed here


# ----------------------------------------------------------------------------- runs


def test_full_training_run_lowers_eval_loss_saves_and_reloads(setup, tmp_path, sft_script):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, base = setup
    out = tmp_path / "sft"
    args = parse_sft_args(*small_run_args(
        data, out, base, "--max_steps", "12", "--learning_rate", "3e-3", "--eval_before_training", "true",
        "--merge", "true",
    ))
    results = sft_script.main(*args)
    assert results["eval_loss"] < results["eval_loss_before"] - 0.5
    assert math.isclose(results["perplexity"], math.exp(results["eval_loss"]))
    assert results["trainable_parameters"] == results["total_parameters"]
    assert json.loads((out / RESULTS_FILE).read_text())["global_step"] == 12
    card = (out / "README.md").read_text()
    assert "Question: <question>" in card and "before training" in card
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()

    for folder in (out, tmp_path / "sft-merged"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        inputs = tokenizer(format_prompt("How do I clean my kettle number 3?"), return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert generated.shape[1] > inputs["input_ids"].shape[1]
        assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)


@pytest.mark.parametrize("bits", [8, 4])
def test_kbit_lora_run_trains_the_adapter_and_merges(setup, tmp_path, sft_script, bits):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data, base = setup
    out = tmp_path / f"sft{bits}"
    args = parse_sft_args(*small_run_args(
        data, out, base, f"--load_in_{bits}bit", "--use_peft", "--lora_r", "4", "--learning_rate", "1e-2",
        "--merge", "true",
    ))
    results = sft_script.main(*args)
    assert results[f"load_in_{bits}bit"] and results["use_peft"]
    assert 0 < results["trainable_parameters"] < results["total_parameters"] / 4
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(float(w.abs().sum()) > 0 for w in lora_b)  # B starts at zero: it was trained
    adapter = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"sft{bits}-merged").eval()
    ids = torch.tensor([[0, 7, 21, 40, 1]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_streaming_run_with_tensorboard(setup, tmp_path, sft_script, no_stream_shutdown_sleep):
    data, base = setup
    out = tmp_path / "stream"
    args = parse_sft_args(*small_run_args(data, out, base, "--streaming", "--report_to", "tensorboard"))
    results = sft_script.main(*args)
    assert results["global_step"] == 2 and math.isfinite(results["eval_loss"])
    assert list(out.rglob("events.out.tfevents.*"))


def test_default_model_is_built_beside_the_output(setup, tmp_path, sft_script):
    data, _ = setup
    from sft_helpers import write_small_config

    config = write_small_config(tmp_path / "config")
    out = tmp_path / "run" / "sft"
    args = parse_sft_args(*small_run_args(data, out, None, "--tiny_model_config", str(config), "--max_steps", "1"))
    results = sft_script.main(*args)
    assert results["base_model"] == str(tmp_path / "run" / "base")
    assert (tmp_path / "run" / "base" / "tokenizer.json").is_file()


def test_bad_input_errors(setup, tmp_path, sft_script):
    data, base = setup
    with pytest.raises(ValueError, match="--max_steps"):
        sft_script.main(*parse_sft_args(*small_run_args(data, tmp_path / "o", base, "--streaming", "--max_steps", "-1")))
    with pytest.raises(ValueError, match="no full block"):
        sft_script.main(*parse_sft_args(*small_run_args(data, tmp_path / "o", base, "--max_length", "4096")))
    with pytest.raises(ValueError, match="--use_peft"):
        sft_script.main(*parse_sft_args(*small_run_args(data, tmp_path / "o", base, "--load_in_8bit")))


def test_cli_reports_a_missing_data_folder_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sft.py"), "--config", str(REPO / "configs/sft/tiny.yaml"),
         "--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 1
    assert "does not exist: create it with `python scripts/prepare_data.py" in proc.stderr
    assert "Traceback" not in proc.stderr
