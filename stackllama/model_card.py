"""The README.md (Hugging Face model card) each model-writing stage leaves in its output folder.

One mechanism (:func:`write_card`: YAML front matter from ``ModelCardData``, then a markdown
body, written atomically) and the three cards' texts: the SFT model (:func:`write_sft_card`),
the reward model (:func:`write_reward_card`) and a merged adapter (:func:`write_merge_card`).
The texts live together so that what every output folder says about itself reads in one place;
each takes the stage's results dict, so a card never states a figure the results file lacks.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import write_text
from .sft import perplexity

CARD_FILE = "README.md"


def front_matter(**metadata) -> str:
    """The card's YAML metadata (``huggingface_hub.ModelCardData``; None values are left out)."""
    # deferred: not needed for a script's --help
    from huggingface_hub import ModelCardData

    return ModelCardData(**metadata).to_yaml()


def write_card(folder: str | os.PathLike, metadata: dict, body: str) -> Path:
    """``folder/README.md``: the front matter of ``metadata`` between ``---`` lines, then ``body``."""
    return write_text(Path(folder) / CARD_FILE, f"---\n{front_matter(**metadata)}\n---\n{body}")


def hub_name(name: str) -> str | None:
    """``name`` as card metadata: a Hub id is kept, a local path (meaningless on the Hub) dropped."""
    return None if Path(name).exists() else name


def python_block(code: str) -> str:
    return f"```python\n{code}\n```\n"


def load_code(model_class: str, module: str, output_dir: str, comment: str = "") -> str:
    """The two lines that load the saved model with ``module.model_class``."""
    comment = f"  # {comment}" if comment else ""
    return f"from {module} import {model_class}\nmodel = {model_class}.from_pretrained({output_dir!r}){comment}"


# --------------------------------------------------------------------------- SFT


def write_sft_card(output_dir: str, base_model: str, data: str, results: dict) -> Path:
    """The SFT model: what it is, how to load and prompt it, how it was trained, its held-out loss."""
    lora = results.get("use_peft")
    if lora:
        load = load_code("AutoPeftModelForCausalLM", "peft", output_dir, "or the merged copy (--merge)")
    else:
        load = load_code("AutoModelForCausalLM", "transformers", output_dir)
    usage = f"""from transformers import AutoTokenizer
{load}
tokenizer = AutoTokenizer.from_pretrained({output_dir!r})
prompt = "Question: How do I descale my espresso machine?\\n\\nAnswer: "
inputs = tokenizer(prompt, return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64, do_sample=True)[0]))"""
    before, after = results.get("eval_loss_before"), results.get("eval_loss")
    quant = "8-bit" if results.get("load_in_8bit") else "4-bit" if results.get("load_in_4bit") else "full-precision"
    body = f"""
# {Path(output_dir).name}: StackLLaMA supervised fine-tuning

The SFT stage of the StackLLaMA recipe (Stack Exchange -> SFT -> reward model -> PPO): a causal LM
fine-tuned on Stack Exchange questions and their preferred answers.

- Base model: `{base_model}` ({quant} base, {"LoRA adapter" if lora else "full training"})
- Data: `{data}`, `finetune` pairs, preferred answer `response_j`
- Text: `Question: <question>\\n\\nAnswer: <answer>`, texts joined by EOS
- Packing: {results.get("packing")} (strategy `{results.get("packing_strategy")}`, blocks of {results.get("max_length")} tokens)
- Trainable parameters: {results.get("trainable_parameters", 0):,} of {results.get("total_parameters", 0):,}
- Steps: {results.get("global_step")}, training time {results.get("train_runtime_s") or 0:.0f} s

## Evaluation (held-out questions)

| | loss | perplexity |
|---|---|---|
| before training | {_fmt(before)} | {_fmt(perplexity(before))} |
| after training | {_fmt(after)} | {_fmt(perplexity(after))} |

## Usage

{python_block(usage)}"""
    metadata = dict(
        library_name="peft" if lora else "transformers",
        base_model=hub_name(base_model),
        datasets=[data] if hub_name(data) else None,
        tags=["stackllama", "sft", "trl", "stack-exchange"] + (["lora"] if lora else []),
        pipeline_tag="text-generation",
    )
    return write_card(output_dir, metadata, body)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- reward model


def write_reward_card(output_dir: str, base_model: str, data: str, results: dict) -> Path:
    """The reward model: what it is, its accuracy before and after training, how to score text with it."""
    after, before = results.get("eval_after"), results.get("eval_before")
    rows = []
    for name, m in (("untrained (random head)", before), ("trained", after)):
        if m:
            gaps = " / ".join("n/a" if g["accuracy"] is None else f"{g['accuracy']:.3f}"
                              for g in m["accuracy_by_gap"].values())
            rows.append(f"| {name} | {m['accuracy']:.3f} | {m['mean_margin']:.3f} | {gaps} |")
    baseline = (after or before or {}).get("longer_answer_baseline")
    kind = "LoRA adapter (score head trained in full)" if results.get("use_peft") else "full weights"
    usage = f"""from transformers import pipeline
scorer = pipeline("text-classification", model={output_dir!r}, function_to_apply="none")
scorer("Question: How fine should I grind for pour-over?\\n\\nAnswer: Medium, like sea salt.</s>")"""
    body = f"""# {Path(output_dir).name}: StackLLaMA reward model

The reward-model stage of the StackLLaMA recipe: `{base_model}` with a one-output
sequence-classification head ({kind}), trained on `{data}` `reward` pairs with the loss
`-logsigmoid(r_j - r_k)`. It reads `Question: <q>\\n\\nAnswer: <a><eos>` and scores at the EOS.

- training pairs: {results.get("train_pairs")} ({results.get("train_pairs_dropped", 0)} dropped as longer than {results.get("max_length")} tokens)
- evaluation pairs: {results.get("eval_pairs")} ({results.get("eval_pairs_dropped", 0)} dropped)

| model | accuracy | mean margin | accuracy by pm_score gap 1 / 2 / 3+ |
|---|---|---|---|
{chr(10).join(rows)}

A model that only prefers the longer answer would reach {baseline if baseline is None else f"{baseline:.3f}"} on these pairs.

{python_block(usage)}"""
    metadata = dict(library_name="peft" if results.get("use_peft") else "transformers",
                    tags=["stackllama", "reward-model", "trl", "stack-exchange"])
    return write_card(output_dir, metadata, body)


# --------------------------------------------------------------------------- merged adapter


def write_merge_card(folder: str | os.PathLike, output_dir: str, results: dict) -> Path:
    """The merged model, written into the staging ``folder`` that becomes ``output_dir``: what it was
    merged from, in which dtype, and the check's figure."""
    base, task, stage = results["base_model"], results["task"], results["stage"]
    if results["verified"]:
        check = (f"verified: logits of the saved model match base+adapter on a {results['probe_tokens']}-token "
                 f"probe (max |diff| {results['max_abs_diff']:.1e}, tolerance {results['tolerance']:.1e})")
    else:
        check = "not verified (`--verify false`)"
    if results["value_head"] == "kept":
        load = load_code("AutoModelForCausalLMWithValueHead", "stackllama.ppo", output_dir, "policy + value head")
    else:
        cls = "AutoModelForSequenceClassification" if task == "seq_cls" else "AutoModelForCausalLM"
        load = load_code(cls, "transformers", output_dir)
    dequantized = " (a saved 8/4-bit checkpoint, dequantised)" if results["dequantized_base"] else ""
    body = f"""
# {Path(output_dir).name}: StackLLaMA {stage} model, LoRA merged into full weights

- Base model: `{base}`{dequantized}
- Adapter: `{results["adapter"]}` ({stage} stage, {task})
- dtype: {results["dtype"]}
- Value head: {results["value_head"]}
- Check: {check}

## Usage

{python_block(load)}"""
    metadata = dict(
        library_name="transformers",
        base_model=hub_name(base),
        tags=["stackllama", stage, "merged-lora"],
        pipeline_tag="text-classification" if task == "seq_cls" else "text-generation",
    )
    return write_card(folder, metadata, body)


def write_dpo_card(output_dir: str, base_model: str, data: str, results: dict) -> Path:
    """The DPO model's README.md: what it is, its implicit-reward accuracy before and after, how to load it."""
    rows = []
    for name, m in (("SFT model (the reference: every reward 0)", results.get("eval_before")),
                    ("after DPO", results.get("eval_after"))):
        if m:
            rows.append(f"| {name} | {m['accuracy']:.3f} | {m['mean_margin']:.4f} | {m['likelihood_accuracy']:.3f} |")
    baseline = (results.get("eval_after") or results.get("eval_before") or {}).get("longer_answer_baseline")
    lora, r = results.get("use_peft"), results
    load = load_code("AutoPeftModelForCausalLM", "peft", output_dir) if lora else \
        load_code("AutoModelForCausalLM", "transformers", output_dir)
    body = f"""
# {Path(output_dir).name}: StackLLaMA policy trained with DPO

`{base_model}` trained with Direct Preference Optimization (TRL's `DPOTrainer`, beta {r.get("beta")},
loss {", ".join(r.get("loss_type") or [])}, {"LoRA adapter" if lora else "full training"}) on `{data}`
`{r.get("train_subset")}` pairs: prompt `Question: <q>\\n\\nAnswer: `, chosen `response_j`, rejected `response_k`.

- training pairs: {r.get("train_pairs")} ({r.get("train_pairs_dropped", 0)} dropped as too long), {r.get("global_step")} steps
- evaluation pairs (`{r.get("eval_subset")}`): {r.get("eval_pairs")} ({r.get("eval_pairs_dropped", 0)} dropped)

Implicit reward `beta * (log pi(y|x) - log pi_ref(y|x))`, the reference being the SFT model:

| model | accuracy (chosen above rejected) | mean margin | policy likelihood prefers chosen |
|---|---|---|---|
{chr(10).join(rows)}

A model that only prefers the longer answer would reach {"n/a" if baseline is None else f"{baseline:.3f}"} here.

{python_block(load)}"""
    metadata = dict(library_name="peft" if lora else "transformers", base_model=hub_name(base_model),
                    datasets=[data] if hub_name(data) else None,
                    tags=["stackllama", "dpo", "trl", "stack-exchange"] + (["lora"] if lora else []),
                    pipeline_tag="text-generation")
    return write_card(output_dir, metadata, body)
