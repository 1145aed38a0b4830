"""Tiny, offline fixtures for the PPO tests: a word-level tokenizer and a random LLaMA.

Kept separate from the other stages' fixtures on purpose: the PPO tests build everything
they need here, so they do not depend on the SFT stage's tiny model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@pytest.fixture
def one_thread():
    """The PPO tests use models far too small to gain from threads; one thread keeps them
    fast on a shared machine (no OpenMP spin-waiting) and is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
WORDS = [f"w{i}" for i in range(28)] + ["```", "."]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def make_model(tokenizer=None, seed: int = 0, layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def make_queries(tokenizer, n: int, seed: int = 0, min_len: int = 2, max_len: int = 6):
    g = torch.Generator().manual_seed(seed)
    first_word = len(SPECIALS)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(torch.randint(first_word, first_word + 28, (length,), generator=g))
    return out


def make_policy(tokenizer, lora: bool = True, seed: int = 0, lora_dropout: float = 0.0, value_head_dropout: float = 0.0, **kw):
    """A value-head policy around the tiny LLaMA, with LoRA on q/v by default."""
    from peft import LoraConfig, get_peft_model

    from stackllama.ppo import AutoModelForCausalLMWithValueHead

    base = make_model(tokenizer, seed=seed, **kw)
    if lora:
        base = get_peft_model(
            base,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=lora_dropout, task_type="CAUSAL_LM"),
        )
    return AutoModelForCausalLMWithValueHead(base, value_head_dropout=value_head_dropout)


def make_trainer(lora: bool = True, tokenizer=None, policy=None, ref_model=None, **overrides):
    from stackllama.ppo import PPOConfig, PPOTrainer

    tokenizer = tokenizer or make_tokenizer()
    policy = policy or make_policy(tokenizer, lora=lora)
    cfg = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, seed=0)
    cfg.update(overrides)
    return PPOTrainer(PPOConfig(**cfg), policy, ref_model, tokenizer)


def rollout(trainer, n: int = 4, seed: int = 0, max_new_tokens: int = 6, **gen):
    queries = make_queries(trainer.tokenizer, n, seed=seed)
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": max_new_tokens, **gen}
    responses = trainer.generate(queries, return_prompt=False, **gen)
    return queries, responses


def trainable_snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.unwrapped_model.named_parameters() if p.requires_grad}


def same_weights(trainer, snapshot) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in trainer.unwrapped_model.named_parameters() if p.requires_grad)
