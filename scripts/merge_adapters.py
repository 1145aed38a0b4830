"""Merge a LoRA adapter (SFT, reward model or PPO policy) into full weights, and check the result.

The base is reloaded un-quantised in `--dtype` (even when the adapter was trained on an 8-bit or
4-bit base), the adapter merged into it, and the saved merged model must reproduce base+adapter's
logits on a probe text before the output folder appears. The output holds safetensors weights,
the tokenizer, a model card and `merge_results.json` (written last); a PPO policy's value head is
kept beside the weights unless `--value_head drop`.

The recipe:
```bash
python scripts/merge_adapters.py --adapter_model_name runs/llama-7b/sft --base_model_name huggyllama/llama-7b \\
    --output_name runs/llama-7b/sft-merged
python scripts/merge_adapters.py --adapter_model_name runs/llama-7b/reward --base_model_name runs/llama-7b/sft-merged \\
    --output_name runs/llama-7b/reward-merged --dtype bfloat16
python scripts/merge_adapters.py --adapter_model_name runs/llama-7b/ppo --output_name runs/llama-7b/ppo-merged
```

CPU: a LoRA SFT run on the tiny model, merged into the base its adapter config records:
```bash
python scripts/sft.py --config configs/sft/tiny.yaml --model_name_or_path runs/tiny/base --use_peft \\
    --output_dir runs/tiny/sft-lora --merge false   # --merge true would run the same merge itself
python scripts/merge_adapters.py --adapter_model_name runs/tiny/sft-lora --output_name runs/tiny/sft-lora-merged
```
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
from stackllama.merge import MergeArguments, merge_from_args
from stackllama.stage import run_script

if __name__ == "__main__":
    run_script(merge_from_args, (MergeArguments,), __doc__)
