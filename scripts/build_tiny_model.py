"""Build the tiny default model: a few-million-parameter LLaMA and a byte-level BPE tokenizer.

    python scripts/build_tiny_model.py                                   # runs/tiny/data -> runs/tiny/base
    python scripts/build_tiny_model.py --data_dir runs/cs/data --output_dir runs/cs/base --seed 1

The architecture comes from configs/tiny_model/config.json (a LlamaConfig); the tokenizer is
trained on the `finetune` pairs of a `prepare_data.py` output. The folder is a normal
`save_pretrained` folder: pass it as `--model_name_or_path` to any stage. `scripts/sft.py`
builds it by itself (beside its output folder) when no model is given.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
from dataclasses import dataclass, field

from stackllama.data.loading import check_data_dir
from stackllama.stage import run_script
from stackllama.tiny_model import (
    DEFAULT_MAX_TOKENIZER_TEXTS,
    build_tiny_model_from_data,
)


@dataclass
class ScriptArguments:
    data_dir: str = field(default="runs/tiny/data", metadata={"help": "Output folder of scripts/prepare_data.py."})
    output_dir: str = field(default="runs/tiny/base", metadata={"help": "Where to write the model and tokenizer."})
    tiny_model_config: str | None = field(
        default=None, metadata={"help": "Folder holding the config.json; default: the repo's configs/tiny_model."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the weight initialisation."})
    max_texts: int = field(
        default=DEFAULT_MAX_TOKENIZER_TEXTS, metadata={"help": "Train the tokenizer on at most this many pairs."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Rebuild even if output_dir holds a complete build."})


def main(args: ScriptArguments) -> None:
    check_data_dir(args.data_dir)
    path = build_tiny_model_from_data(
        args.output_dir, args.data_dir, config=args.tiny_model_config, seed=args.seed,
        max_texts=args.max_texts, overwrite=args.overwrite,
    )
    print(f"tiny model in {path}")


if __name__ == "__main__":
    run_script(main, (ScriptArguments,), __doc__)
