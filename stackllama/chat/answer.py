"""One answer from one policy: the recipe's prompt, sampling as the PPO stage samples by default,
tokens streamed as they are generated (transformers' `TextIteratorStreamer`), and the reward
model's score of the finished answer with its length."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from ..data.template import format_prompt
from ..errors import InputError
from ..evaluation.policies import Policy


@dataclass
class SamplingSettings:
    """How answers are sampled. The defaults are the PPO stage's (`top_k=0, top_p=1`, temperature 1,
    at most the recipe's `output_max_length` of 128 new tokens), stopping at EOS."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise InputError(f"--temperature must be above 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"--top_k must be 0 (off) or more, got {self.top_k}")

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class Answer:
    """A finished answer: its text, its tokens (EOS excluded), whether it ended with EOS, and its score."""

    policy: str
    question: str
    text: str
    response_ids: list[int]
    ended: bool
    score: float | None = None

    @property
    def tokens(self) -> int:
        return len(self.response_ids)

    def summary(self) -> str:
        """`reward 0.412 · 87 tokens · ended with EOS` (the score left out when there is no reward model)."""
        parts = [f"reward {self.score:.3f}"] if self.score is not None else []
        parts.append(f"{self.tokens} tokens")
        parts.append("ended with EOS" if self.ended else "cut at the token limit")
        return " · ".join(parts)


def _prompt_ids(tokenizer, model, question: str, max_new_tokens: int) -> torch.Tensor:
    question = question.strip()
    if not question:
        raise InputError("the question is empty")
    ids = tokenizer(format_prompt(question), return_tensors="pt")["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise InputError(f"the question is {ids.shape[1]} tokens; with --max_new_tokens {max_new_tokens} that is "
                         f"over the model's {limit} positions: ask a shorter question or lower --max_new_tokens")
    return ids


class AnswerStream:
    """Iterate to get the answer's text as it is generated; afterwards `.answer` is the whole answer.

    Generation runs in a thread feeding a `TextIteratorStreamer` (the pattern of transformers' docs and
    of Gradio chat demos); an error in that thread is raised here, not lost. The seed is set right
    before `generate`, so the same seed gives the same tokens streamed or not (`answer_question`).
    """

    def __init__(self, policy: Policy, tokenizer, question: str, settings: SamplingSettings, reward_fn=None,
                 stream: bool = True):
        # deferred: transformers is slow to import (--help)
        from transformers import TextIteratorStreamer

        settings.check()
        self.policy, self.tokenizer, self.question, self.settings = policy, tokenizer, question, settings
        self.reward_fn = reward_fn
        self.prompt_ids = _prompt_ids(tokenizer, policy.model, question, settings.max_new_tokens)
        self.streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        self.answer: Answer | None = None
        self._output: torch.Tensor | None = None
        self._error: BaseException | None = None

    @torch.no_grad()
    def _generate(self) -> None:
        try:
            eos = self.tokenizer.eos_token_id
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
            device = self.policy.device
            with self.policy.active():
                torch.manual_seed(self.settings.seed)
                self._output = self.policy.model.generate(
                    input_ids=self.prompt_ids.to(device), attention_mask=torch.ones_like(self.prompt_ids).to(device),
                    max_new_tokens=self.settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                    streamer=self.streamer, **self.settings.generate_kwargs())
        except BaseException as error:  # re-raised by the consumer, in its thread
            self._error = error
            if self.streamer is not None:
                self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        if self.streamer is None:
            self._generate()
        else:
            thread = threading.Thread(target=self._generate, daemon=True)
            thread.start()
            yield from self.streamer
            thread.join()
        if self._error is not None:
            raise self._error
        self.answer = self._finish()
        if self.streamer is None:
            yield self.answer.text

    def _finish(self) -> Answer:
        response = self._output[0, self.prompt_ids.shape[1]:].cpu().tolist()
        eos = self.tokenizer.eos_token_id
        ended = eos in response
        if ended:
            response = response[: response.index(eos)]
        text = self.tokenizer.decode(response, skip_special_tokens=True)
        answer = Answer(self.policy.name, self.question, text, response, ended)
        if self.reward_fn is not None:
            query = format_prompt(self.question.strip())
            answer.score = self.reward_fn([query + text], [self.prompt_ids[0]], [torch.tensor(response, dtype=torch.long)])[0]
        return answer


def answer_question(policy: Policy, tokenizer, question: str, settings: SamplingSettings, reward_fn=None,
                    stream: bool = False) -> Answer:
    """The whole answer at once (`stream=False`: no streamer, no thread)."""
    answers = AnswerStream(policy, tokenizer, question, settings, reward_fn, stream=stream)
    for _ in answers:
        pass
    return answers.answer
