"""The tiny default model: LLaMA architecture from the shipped config, BPE tokenizer, determinism."""

import json

import pytest
from sft_helpers import REPO, build_small_model, write_pairs, write_small_config

from stackllama.data.template import format_example, format_prompt
from stackllama.tiny_model import (
    BUILD_INFO_FILE,
    build_tiny_model,
    is_built,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("tiny") / "data")


def test_shipped_config_is_a_few_million_parameter_llama():
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(REPO / "configs" / "tiny_model")
    assert config.model_type == "llama" and config.hidden_act == "silu" and not config.tie_word_embeddings
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 2e7
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert type(model.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"


def test_build_saves_a_loadable_llama_with_distinct_pad(tmp_path, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_small_model(tmp_path, data_dir)
    assert is_built(base) and (base / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # LLaMA-style encoding: BOS first, byte-level round trip (code, unicode, runs of spaces)
    text = format_example("Wie mahle ich Bohnen? ☕", "Use `grind --fine`   then\n\twait.")
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    info = json.loads((base / BUILD_INFO_FILE).read_text())
    assert info["seed"] == 0 and info["parameters"] == sum(p.numel() for p in model.parameters())


def test_build_is_deterministic_and_reused(tmp_path, data_dir):
    first = build_small_model(tmp_path / "a", data_dir)
    second = build_small_model(tmp_path / "b", data_dir)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    build_small_model(tmp_path / "a", data_dir)  # already built: kept as is
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_other_seed_gives_other_weights(tmp_path):
    texts = [format_example(f"question {i}", f"answer {i}") for i in range(50)]
    config = write_small_config(tmp_path / "config")
    a = build_tiny_model(tmp_path / "a", texts, config=config, seed=0)
    b = build_tiny_model(tmp_path / "b", texts, config=config, seed=1)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tokenizer_special_tokens_and_prompt():
    tokenizer = train_tokenizer([format_example("q", "a")] * 5, vocab_size=300)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.decode(tokenizer(format_prompt("q"))["input_ids"], skip_special_tokens=True) == "Question: q\n\nAnswer: "


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="tiny model config not found"):
        build_tiny_model(tmp_path / "m", ["text"], config=tmp_path / "nowhere")
