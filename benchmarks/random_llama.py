"""Writes a randomly initialised LLaMA of a given shape with an existing tokenizer, for speed and memory runs.

Real checkpoints need a download; the figures in the README's "Measured on one GPU" came from
the LLaMA-7B shape built here with the tiny tokenizer (weights made on the GPU in bf16, saved
as safetensors), then the recipe's configs pointed at it:

    python benchmarks/random_llama.py --tokenizer runs/tiny/base --output_dir runs/llama-7b-random   # 6.5B, ~13 GB
    python scripts/rl_ppo.py --config configs/ppo/llama-7b.yaml --model_name_or_path runs/llama-7b-random \\
        --reward_model_name runs/llama-7b-random --data_dir runs/tiny/data --steps 5 --report_to none

The vocabulary is the tokenizer's (4096 for the tiny one, not LLaMA's 32000). Random weights
say nothing about quality: only seconds, tokens/s and memory are meaningful.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with a tokenizer and config.json (e.g. runs/tiny/base)")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--layers", type=int, default=32, help="LLaMA-7B: 32")
    ap.add_argument("--hidden", type=int, default=4096, help="LLaMA-7B: 4096")
    ap.add_argument("--intermediate", type=int, default=11008, help="LLaMA-7B: 11008")
    ap.add_argument("--heads", type=int, default=32, help="LLaMA-7B: 32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    source = json.loads((Path(args.tokenizer) / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=source["vocab_size"], hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=source.get("bos_token_id"), eos_token_id=source.get("eos_token_id"),
        pad_token_id=source.get("pad_token_id"),
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"random LLaMA, {n / 1e9:.2f}B parameters ({args.layers} x {args.hidden}), in {args.output_dir} "
          f"after {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
