"""The tiny default model: a few-million-parameter LLaMA that lets every stage run offline.

A user on a GPU box passes a Hub id or a local path. Without one, the pipeline builds this
model instead, so that the whole recipe runs on a laptop or in CI with no download:

- the architecture comes from a config the repository ships (`configs/tiny_model/config.json`),
  read as a `LlamaConfig`, so the code path is the one of LLaMA-7B (`LlamaForCausalLM`,
  RoPE, SwiGLU, RMSNorm, untied embeddings);
- the tokenizer is a byte-level BPE trained with `tokenizers` on the texts of the
  `finetune` split, with `<s>` (BOS, prepended like LLaMA's), `</s>` (EOS) and a distinct
  `<pad>` (a reward model looks for the last non-pad token, which goes wrong when pad == eos);
- both are written with `save_pretrained` (safetensors), so every later stage loads the folder
  like any other model. The build is deterministic from a seed, and written into a temporary
  folder that replaces `output_dir` when complete (`stackllama.atomic.staged_dir`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import staged_dir, write_json
from .data.loading import load_pairs
from .data.template import format_example
from .errors import InputError, MissingInputError
from .run_layout import TINY_MODEL_RESULTS, is_full_model

logger = logging.getLogger(__name__)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2

# Written last into the model folder: its presence marks a complete build.
BUILD_INFO_FILE = TINY_MODEL_RESULTS

DEFAULT_MAX_TOKENIZER_TEXTS = 20_000


def default_config_dir() -> Path:
    """`configs/tiny_model` of the repository this package belongs to."""
    return Path(__file__).resolve().parent.parent / "configs" / "tiny_model"


def _resolve_config_dir(config: str | Path | None) -> Path:
    path = Path(config) if config is not None else default_config_dir()
    if path.is_file():
        path = path.parent
    if not (path / "config.json").is_file():
        raise MissingInputError(
            f"tiny model config not found: {path / 'config.json'}. Pass --tiny_model_config with the folder "
            "holding the repository's configs/tiny_model/config.json (a LlamaConfig as JSON)."
        )
    return path


def is_built(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a complete tiny model build (written by `build_tiny_model`)."""
    model_dir = Path(model_dir)
    return (model_dir / BUILD_INFO_FILE).is_file() and is_full_model(model_dir)


def finetune_texts(dataset: Iterable[dict], max_texts: int | None = DEFAULT_MAX_TOKENIZER_TEXTS) -> Iterator[str]:
    """SFT texts (`Question: ...\\n\\nAnswer: <response_j>`) plus the rejected answers, for tokenizer training.

    Questions repeat across the pairs of one question; each one is used once.
    """
    seen: set[int] = set()
    count = 0
    for row in dataset:
        if max_texts is not None and count >= max_texts:
            return
        qid = row.get("qid")
        if qid in seen:
            text = row["response_j"]
        else:
            seen.add(qid)
            text = format_example(row["question"], row["response_j"])
        yield text + "\n" + row.get("response_k", "")
        count += 1


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer (`tokenizers`) wrapped as a `transformers` fast tokenizer.

    Encoding prepends `<s>` like the LLaMA tokenizer; `</s>` is EOS and `<pad>` the padding token.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise InputError("no texts to train the tokenizer on: is the finetune split empty?")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    output_dir: str | Path,
    texts: Iterable[str],
    config: str | Path | None = None,
    seed: int = 42,
    overwrite: bool = False,
):
    """Train the tokenizer on `texts`, initialise the LLaMA model from the shipped config, save both.

    Returns `output_dir` as a `Path`. An existing complete build is kept unless `overwrite`.
    """
    import torch
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    if is_built(output_dir) and not overwrite:
        logger.info("tiny model already built in %s; reusing it", output_dir)
        return output_dir
    config_dir = _resolve_config_dir(config)
    model_config = AutoConfig.from_pretrained(config_dir)
    if model_config.model_type != "llama":
        raise InputError(f"{config_dir / 'config.json'}: expected model_type 'llama', got {model_config.model_type!r}")

    tokenizer = train_tokenizer(texts, vocab_size=model_config.vocab_size)
    if len(tokenizer) > model_config.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {model_config.vocab_size}")
    if len(tokenizer) < model_config.vocab_size:
        logger.warning(
            "the BPE vocabulary stopped at %d tokens (vocab_size %d): the training texts are small; "
            "the unused embedding rows stay at their initial values",
            len(tokenizer),
            model_config.vocab_size,
        )
    model_config.bos_token_id = tokenizer.bos_token_id
    model_config.eos_token_id = tokenizer.eos_token_id
    model_config.pad_token_id = tokenizer.pad_token_id

    # Initialisation under a fixed seed, independent of the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    n_params = sum(p.numel() for p in model.parameters())
    with staged_dir(output_dir) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        write_json(staged / BUILD_INFO_FILE, {
            "config": str(config_dir / "config.json"),
            "seed": seed,
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "tokenizer_sha256": hashlib.sha256((staged / "tokenizer.json").read_bytes()).hexdigest(),
        })
    logger.info("built tiny LLaMA (%.2fM parameters, vocab %d) in %s", n_params / 1e6, len(tokenizer), output_dir)
    return output_dir


def build_tiny_model_from_data(
    output_dir: str | Path,
    data: str | Path,
    config: str | Path | None = None,
    seed: int = 42,
    max_texts: int | None = DEFAULT_MAX_TOKENIZER_TEXTS,
    overwrite: bool = False,
) -> Path:
    """`build_tiny_model` with the tokenizer trained on the `finetune` split of a prepared data folder."""
    output_dir = Path(output_dir)
    if is_built(output_dir) and not overwrite:
        logger.info("tiny model already built in %s; reusing it", output_dir)
        return output_dir
    dataset = load_pairs(data, "finetune", streaming=True)
    return build_tiny_model(output_dir, finetune_texts(dataset, max_texts), config=config, seed=seed, overwrite=True)
