"""Merging adapters into full weights: each adapter kind gives the same outputs as base+adapter,
quantised bases are merged un-quantised, the check catches a bad merge, the output is all or nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from sft_helpers import REPO, build_small_model, write_pairs
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from trl import ModelConfig

from stackllama.cli import parse_args
from stackllama.merge import (
    RESULTS_FILE,
    MergeArguments,
    MergeError,
    merge_adapter,
    merge_from_args,
)
from stackllama.modeling import MissingDependencyError, load_model, lora_config
from stackllama.ppo import AutoModelForCausalLMWithValueHead

TEXTS = ["Question: How do I clean my kettle number 3?\n\nAnswer: Rinse the kettle", "Question: beans?\n\nAnswer: roast"]


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only cost time on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    return build_small_model(tmp, write_pairs(tmp / "data"))


@pytest.fixture(scope="module")
def tokenizer(base):
    return AutoTokenizer.from_pretrained(base)


def outputs(model, tokenizer, texts=TEXTS):
    """Logits (causal LM: every position; classifier: the score) of each text, one at a time (no padding)."""
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits.float() for t in texts]


def assert_same(got, expected, atol=1e-5):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=atol, rtol=0)


def perturb(model, std=0.3):
    """Non-zero LoRA B (zero at init) and a changed score head, so a merge that loses them is visible."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * std)
    return model.eval()


def causal_adapter(base, folder, model=None):
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(base)
    lora = perturb(get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                    target_modules=["q_proj", "v_proj", "down_proj"])))
    lora.save_pretrained(folder)
    return lora


def no_leftovers(parent):
    return not [p.name for p in parent.iterdir() if ".merging-" in p.name or ".old-" in p.name]


def test_causal_lm_merge_matches_base_plus_adapter(base, tokenizer, tmp_path):
    lora = causal_adapter(base, tmp_path / "sft")
    expected = outputs(lora, tokenizer)
    (tmp_path / "sft" / "sft_results.json").write_text("{}")
    results = merge_adapter(tmp_path / "sft", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_same(outputs(merged, tokenizer), expected)
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    assert (outputs(plain, tokenizer)[0] - expected[0]).abs().max() > 1e-2  # the adapter matters
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", RESULTS_FILE} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} & files
    assert not any(name.endswith(".bin") for name in files)
    assert results == json.loads((tmp_path / "merged" / RESULTS_FILE).read_text())
    assert (results["task"], results["stage"], results["dtype"], results["value_head"]) == ("causal_lm", "sft", "float32", "none")
    assert results["verified"] and results["max_abs_diff"] <= results["tolerance"] == pytest.approx(
        1e-4 * max(1.0, float(max(e.abs().max() for e in expected))), rel=0.5)
    assert results["base_model"] == str(base) and results["probe_tokens"] > 5
    card = (tmp_path / "merged" / "README.md").read_text()
    assert str(base) in card and str(tmp_path / "sft") in card and "sft stage" in card and "verified" in card
    assert no_leftovers(tmp_path)


def test_a_merge_cleans_up_after_a_killed_one(base, tmp_path):
    """A merge killed before its rename leaves its staging folder (the size of the model);
    the next merge into the same output removes it when its process is gone, and leaves the
    folder of a merge that still runs (here: this process's id)."""
    import socket

    causal_adapter(base, tmp_path / "sft")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a finished process: its id is free
    host = socket.gethostname()
    abandoned = tmp_path / f".merged.merging-{host}-{dead.pid}-abc123"
    running = tmp_path / f".merged.merging-{host}-{os.getpid()}-def456"
    other_output = tmp_path / f".other.merging-{host}-{dead.pid}-ghi789"
    for folder in (abandoned, running, other_output):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    merge_adapter(tmp_path / "sft", tmp_path / "merged")
    assert not abandoned.exists()
    assert running.exists() and other_output.exists()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_seq_cls_adapter_with_trained_score_head(base, tokenizer, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = perturb(get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    expected = outputs(lora, tokenizer)
    lora.save_pretrained(tmp_path / "reward")
    tokenizer.save_pretrained(tmp_path / "reward")
    results = merge_adapter(tmp_path / "reward", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    assert_same(outputs(merged, tokenizer), expected)
    assert (results["task"], results["stage"]) == ("seq_cls", "reward") and results["verified"]


@pytest.mark.parametrize("value_head", ["keep", "drop"])
def test_ppo_policy_with_value_head(base, tokenizer, tmp_path, value_head):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(base), peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        value_head_dropout=0.0,
    )
    perturb(policy)
    with torch.no_grad():
        policy.v_head.summary.weight.normal_(std=1.0)
    policy.save_pretrained(str(tmp_path / "ppo"))
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits, values = policy(input_ids=ids)
    results = merge_adapter(tmp_path / "ppo", tmp_path / "merged", value_head=value_head)
    assert results["stage"] == "ppo" and results["verified"]
    head_files = {"value_head.safetensors", "value_head_config.json"} & {p.name for p in (tmp_path / "merged").iterdir()}
    if value_head == "keep":
        assert results["value_head"] == "kept" and len(head_files) == 2
        merged = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "merged")).eval()
        assert not merged.is_peft_model
        with torch.no_grad():
            merged_logits, merged_values = merged(input_ids=ids)
        torch.testing.assert_close(merged_values, values, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=0)
        assert "AutoModelForCausalLMWithValueHead" in (tmp_path / "merged" / "README.md").read_text()
    else:
        assert results["value_head"] == "dropped" and not head_files
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, logits, atol=1e-5, rtol=0)


def test_adapter_trained_on_an_8bit_base_merges_into_the_fp32_base(base, tokenizer, tmp_path):
    """The recipe's path: LoRA trained on a bitsandbytes 8-bit base; the merge reloads the base in fp32."""
    args = ModelConfig(model_name_or_path=str(base), load_in_8bit=True, use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load_model(args), lora_config(args))
    assert model.get_base_model().is_loaded_in_8bit
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = tokenizer(TEXTS[0], return_tensors="pt")
    for _ in range(3):  # a few real training steps on the 8-bit base
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "sft8")
    assert json.loads((tmp_path / "sft8" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    del model

    results = merge_adapter(tmp_path / "sft8", tmp_path / "merged")
    assert results["verified"] and not results["dequantized_base"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "sft8").eval()
    expected = outputs(fp32, tokenizer)
    assert (outputs(AutoModelForCausalLM.from_pretrained(base).eval(), tokenizer)[0] - expected[0]).abs().max() > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.dtype == torch.float32 and type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert_same(outputs(merged, tokenizer), expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_saved_quantised_base_is_dequantised_before_merging(base, tokenizer, tmp_path, bits):
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map={"": "cpu"}).save_pretrained(
        tmp_path / "base-kbit")
    tokenizer.save_pretrained(tmp_path / "base-kbit")
    assert "quantization_config" in json.loads((tmp_path / "base-kbit" / "config.json").read_text())
    kbit = AutoModelForCausalLM.from_pretrained(tmp_path / "base-kbit", device_map={"": "cpu"})  # quantised as saved
    assert getattr(kbit, f"is_loaded_in_{bits}bit")
    causal_adapter(None, tmp_path / "sft", model=kbit)
    del kbit

    results = merge_adapter(tmp_path / "sft", tmp_path / "merged")
    assert results["dequantized_base"] and results["verified"] and results["max_abs_diff"] < 1e-4
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "dequantised" in (tmp_path / "merged" / "README.md").read_text()
    dequantized = AutoModelForCausalLM.from_pretrained(tmp_path / "base-kbit", device_map={"": "cpu"}).dequantize()
    expected = outputs(PeftModel.from_pretrained(dequantized.float(), tmp_path / "sft").eval(), tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert_same(outputs(merged, tokenizer), expected)
    # the original fp32 base is one flag away, and gives the same merge up to quantisation error
    again = merge_adapter(tmp_path / "sft", tmp_path / "merged-orig", base_model=str(base))
    assert again["base_model"] == str(base) and not again["dequantized_base"] and again["verified"]


def test_saved_quantised_base_without_bitsandbytes_is_a_clear_error(base, tokenizer, tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "base-kbit").mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "base-kbit" / "config.json").write_text(json.dumps(config))
    causal_adapter(base, tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    adapter_config = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "base-kbit")
    (tmp_path / "sft" / "adapter_config.json").write_text(json.dumps(adapter_config))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="--base_model_name"):
        merge_adapter(tmp_path / "sft", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and no_leftovers(tmp_path)


def test_bfloat16_output(base, tokenizer, tmp_path):
    from safetensors import safe_open

    lora = causal_adapter(base, tmp_path / "sft")
    expected = outputs(lora, tokenizer)
    results = merge_adapter(tmp_path / "sft", tmp_path / "merged", dtype="bfloat16")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert results["dtype"] == "bfloat16" and results["verified"]
    scale = max(1.0, float(max(e.abs().max() for e in expected)))
    assert results["tolerance"] == pytest.approx(0.1 * scale, rel=0.1)  # the reference is bf16 base + adapter
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    assert_same(outputs(merged, tokenizer), expected, atol=0.1 * scale)


def test_full_weights_folder_is_not_an_adapter(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds full weights.*nothing to merge"):
        merge_adapter(base, tmp_path / "merged")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_existing_output_is_refused_unless_overwrite(base, tokenizer, tmp_path):
    causal_adapter(base, tmp_path / "sft")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_adapter(tmp_path / "sft", tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="its own input"):
        merge_adapter(tmp_path / "sft", tmp_path / "sft", overwrite=True)
    merge_adapter(tmp_path / "sft", tmp_path / "merged", overwrite=True)
    assert not (tmp_path / "merged" / "keep.txt").exists() and (tmp_path / "merged" / RESULTS_FILE).is_file()
    assert no_leftovers(tmp_path)


def test_failed_verification_leaves_no_output(base, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    causal_adapter(base, tmp_path / "sft")
    real = LoraModel.merge_and_unload

    def corrupted(self, *args, **kwargs):
        model = real(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted)
    with pytest.raises(MergeError, match=r"differ from base\+adapter.*max \|diff\|"):
        merge_adapter(tmp_path / "sft", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and no_leftovers(tmp_path)
    # the same corruption goes unnoticed with the check off: the flag is what stands between
    args = parse_args((MergeArguments,), ["--adapter_model_name", str(tmp_path / "sft"), "--output_name",
                                          str(tmp_path / "unchecked"), "--verify", "false"])[0]
    results = merge_from_args(args)
    assert not results["verified"] and results["max_abs_diff"] is None
    assert "not verified" in (tmp_path / "unchecked" / "README.md").read_text()


def run_script(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "merge_adapters.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_script_end_to_end(base, tokenizer, tmp_path):
    causal_adapter(base, tmp_path / "sft")
    (tmp_path / "config.yaml").write_text(f"adapter_model_name: {tmp_path / 'sft'}\ndtype: float32\n")
    proc = run_script("--config", tmp_path / "config.yaml", "--base_model_name", base, "--output_name",
                      tmp_path / "sft-merged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: merged logits match base+adapter on a" in proc.stderr
    out = tmp_path / "sft-merged"
    assert {"model.safetensors", "tokenizer.json", "README.md", RESULTS_FILE} <= {p.name for p in out.iterdir()}
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["verified"] and results["base_model"] == str(base) and results["wall_time_s"] >= 0


def test_script_bad_input_is_one_line(base, tmp_path):
    proc = run_script("--adapter_model_name", base, "--output_name", tmp_path / "merged", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("merge_adapters.py: error: ") and "holds full weights" in last
    assert not (tmp_path / "merged").exists()
