"""The PPO stage's reward: a stage-3 reward model scoring `Question: q\\n\\nAnswer: a`.

`RewardFunction` is the recipe's `sentiment_pipe` made exact:

- **text path** (any reward model, any tokenizer): the texts go through a
  `transformers` text-classification pipeline with `function_to_apply="none"`, so the
  score is the raw logit of the one-output head (the recipe used `outputs[0]["score"]`
  of the same pipeline). EOS is appended first (`append_eos`), as in reward training
  (`stackllama.reward_modeling.reward_text`), because the reward model reads its score at EOS.
- **fast path** (the reward model shares the policy's tokenizer): the policy's own token ids,
  `query_ids + response_ids (+ EOS)`, are scored directly with
  `stackllama.reward_modeling.score_ids`; no decode / re-encode.

The two paths agree exactly when re-encoding `query + response` gives back
`query_ids + response_ids`. That holds for the test tokenizers but not always for BPE or
SentencePiece tokenizers: the recipe's query ends with a space ("Answer: "), which is its
own token when the query is encoded alone but merges into the next word when the whole text
is encoded (which is how the reward model was trained). So `fast_path="auto"` (default)
checks the first batch: it encodes the texts once and uses the fast path only if every
sequence matches the policy's ids; otherwise it keeps the text path for the whole run and
says why. `fast_path="on"` forces it (scores exactly the sampled tokens), `"off"` never.

The function returns the raw scores; the script's loop subtracts `reward_baseline`.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .errors import InputError
from .reward_modeling import load_reward_model, score_ids

logger = logging.getLogger(__name__)

FAST_PATH_MODES = ("auto", "on", "off")


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary, specials and BOS handling)."""
    if a is b:
        return True
    if a.get_vocab() != b.get_vocab() or a.eos_token_id != b.eos_token_id:
        return False
    probe = "Question: Is this the same tokenizer?\n\nAnswer: It is, 42 times."
    return a(probe)["input_ids"] == b(probe)["input_ids"]


class RewardFunction:
    """`reward_fn(texts, query_ids=None, response_ids=None) -> list[float]`, the raw reward-model scores.

    `texts` are `query + response` strings (always needed: the text path and the logs use
    them); `query_ids` / `response_ids` are the policy's tensors, used by the fast path.
    """

    def __init__(
        self,
        model,
        tokenizer,
        policy_tokenizer=None,
        batch_size: int = 16,
        append_eos: bool = True,
        fast_path: str = "auto",
        device=None,
    ) -> None:
        if fast_path not in FAST_PATH_MODES:
            raise InputError(f"reward fast_path must be one of {FAST_PATH_MODES}, got {fast_path!r}")
        if getattr(model, "peft_config", None) is not None and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # a LoRA reward model: plain weights for the pipeline
        if device is not None:
            model.to(device)
        model.eval()
        model.requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.append_eos = append_eos
        self.shares_tokenizer = policy_tokenizer is not None and same_tokenizer(policy_tokenizer, tokenizer)
        if fast_path == "on" and not self.shares_tokenizer:
            raise InputError("reward fast_path 'on' needs a reward model with the policy's tokenizer; use 'auto' or 'off'")
        # None: undecided ("auto", decided on the first batch that brings token ids)
        self.use_fast_path = {"on": True, "off": False, "auto": None if self.shares_tokenizer else False}[fast_path]
        self._pipeline = None

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | None = None, trust_remote_code: bool = False, **kwargs):
        """Load a saved reward model (full weights or LoRA, see `stackllama.reward_modeling.load_reward_model`),
        straight onto `device` when that is an accelerator."""
        model, tokenizer = load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                             device=kwargs.get("device"))
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ the two paths
    @property
    def pipeline(self):
        if self._pipeline is None:
            # transformers.pipelines is slow to import: only on the text path
            from transformers import pipeline

            self._pipeline = pipeline(
                "text-classification", model=self.model, tokenizer=self.tokenizer, device=self.model.device
            )
        return self._pipeline

    def _with_eos(self, text: str) -> str:
        eos = self.tokenizer.eos_token
        return text + eos if self.append_eos and not text.endswith(eos) else text

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Text path: raw logits from the text-classification pipeline."""
        outputs = self.pipeline(
            [self._with_eos(t) for t in texts], batch_size=self.batch_size, function_to_apply="none", top_k=None
        )
        scores = []
        for out in outputs:
            out = out[0] if isinstance(out, list) else out  # top_k=None: one dict per label
            scores.append(float(out["score"]))
        return scores

    def token_sequences(self, query_ids: Sequence[torch.Tensor], response_ids: Sequence[torch.Tensor]) -> list[list[int]]:
        """`query + response (+ EOS)` as the reward model reads them on the fast path."""
        eos = self.tokenizer.eos_token_id
        sequences = []
        for q, r in zip(query_ids, response_ids):
            ids = torch.cat([q.reshape(-1).cpu(), r.reshape(-1).cpu()]).tolist()
            if self.append_eos and (not ids or ids[-1] != eos):
                ids.append(eos)
            sequences.append(ids)
        return sequences

    def score_token_ids(self, query_ids, response_ids) -> list[float]:
        """Fast path: the policy's token ids scored directly (`stackllama.reward_modeling.score_ids`)."""
        sequences = self.token_sequences(query_ids, response_ids)
        return score_ids(self.model, sequences, self.tokenizer.pad_token_id, self.batch_size).tolist()

    def _decide_fast_path(self, texts, query_ids, response_ids) -> bool:
        """'auto': the fast path if re-encoding the first batch gives back the policy's ids."""
        encoded = [self.tokenizer(self._with_eos(t))["input_ids"] for t in texts]
        direct = self.token_sequences(query_ids, response_ids)
        mismatches = sum(e != d for e, d in zip(encoded, direct))
        self.use_fast_path = mismatches == 0
        if self.use_fast_path:
            logger.info("reward: the reward model shares the policy's tokenizer; scoring token ids directly (fast path)")
        else:
            logger.info(
                "reward: same tokenizer, but re-encoding query+response differs from the policy's ids in %d of %d "
                "texts (token boundaries, e.g. the prompt's trailing space); using the text pipeline as in reward "
                "training (--reward_fast_path on forces the fast path)", mismatches, len(texts))
        return self.use_fast_path

    def __call__(self, texts: Sequence[str], query_ids=None, response_ids=None) -> list[float]:
        texts = list(texts)
        if query_ids is not None and response_ids is not None and self.use_fast_path is not False:
            if self.use_fast_path or self._decide_fast_path(texts, query_ids, response_ids):
                return self.score_token_ids(query_ids, response_ids)
        return self.score_texts(texts)
