"""Small offline fixtures for the SFT / tiny-model / modeling tests.

A few dozen crafted pairs written in the `prepare_data.py` layout, and a very small LLaMA
(2 layers, hidden 64) built with the same builder as the tiny default model, so that a
training run is short on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

SMALL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,  # bitsandbytes' 4-bit CPU kernels need in_features >= their block size (64)
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
}

TOPICS = ["espresso", "grinder", "kettle", "beans", "milk", "filter", "roast", "water"]


def pair_rows(n_questions: int = 24, pairs_per_question: int = 2) -> list[dict]:
    rows = []
    for q in range(n_questions):
        topic = TOPICS[q % len(TOPICS)]
        question = f"How do I clean my {topic} number {q}?\n\nIt gets dirty after a week of use."
        for p in range(pairs_per_question):
            rows.append(
                {
                    "qid": 1000 + q,
                    "question": question,
                    "date": "2015/01/27",
                    "metadata": [f"https://coffee.stackexchange.com/questions/{1000 + q}"],
                    "response_j": f"Rinse the {topic} with warm water and vinegar, then dry it. Tip {p}.",
                    "response_k": f"Just buy a new {topic}.",
                }
            )
    return rows


def write_pairs(data_dir: Path, rows: list[dict] | None = None, subset: str = "finetune") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pair_rows() if rows is None else rows
    folder = Path(data_dir) / "pairs" / subset
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-00000.parquet")
    return Path(data_dir)


def write_small_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SMALL_CONFIG))
    return folder


def build_small_model(tmp: Path, data_dir: Path) -> Path:
    from stackllama.tiny_model import build_tiny_model_from_data

    return build_tiny_model_from_data(tmp / "base", data_dir, config=write_small_config(tmp / "config"), seed=0)


def small_stage_inputs(tmp: Path) -> tuple[Path, Path, Path]:
    """(tmp, data, base): finetune, reward and evaluation pairs and a small base model, the inputs of a
    fast SFT or reward-model run in `tmp`."""
    data = write_pairs(tmp / "data")
    write_pairs(data, pair_rows(12), subset="reward")
    write_pairs(data, pair_rows(6), subset="evaluation")
    return tmp, data, build_small_model(tmp, data)


def load_sft_script():
    """scripts/sft.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("sft_script", REPO / "scripts" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_sft_args(*argv: str):
    from trl import ModelConfig, SFTConfig

    from stackllama.cli import parse_args
    from stackllama.sft import SFTScriptArguments

    return parse_args((SFTScriptArguments, SFTConfig, ModelConfig), args=list(argv))


def small_run_args(data_dir: Path, output_dir: Path, base: Path | None, *extra: str) -> list[str]:
    """The tiny CPU config, shrunk: blocks of 32 tokens, 2 steps, no eval before training."""
    args = [
        "--config", str(REPO / "configs" / "sft" / "tiny.yaml"),
        "--data_dir", str(data_dir),
        "--output_dir", str(output_dir),
        "--max_length", "32",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--max_steps", "2",
        "--warmup_steps", "0",
        "--logging_steps", "1",
        "--eval_fraction", "0.25",
        "--eval_before_training", "false",
        "--merge", "false",
        "--dataloader_pin_memory", "false",
        "--disable_tqdm", "true",
    ]
    if base is not None:
        args += ["--model_name_or_path", str(base)]
    return args + list(extra)
