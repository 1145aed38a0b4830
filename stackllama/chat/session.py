"""What the terminal chat and the web demo share: the run's policies and reward model, loaded once,
and each question answered by every policy with the same seed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .. import run_layout
from ..evaluation.policies import Policy, load_policies, load_policy_tokenizer, set_torch_threads
from .answer import Answer, AnswerStream, SamplingSettings
from .arguments import ChatArguments
from .policies import select_policies

logger = logging.getLogger(__name__)


def default_reward_model(args: ChatArguments) -> str | None:
    """`--reward_model`, else the run's reward model when it has one (answers unscored otherwise)."""
    if args.reward_model:
        run_layout.check_model_dir(args.reward_model, "reward model", "--reward_model")
        return args.reward_model
    path = Path(args.run_dir) / run_layout.REWARD
    return str(path) if run_layout.holds_model(path) else None


@dataclass
class ChatSession:
    """The loaded policies (with their tokenizers) and the reward function (or None)."""

    policies: list[tuple[Policy, object]]
    reward_fn: object | None
    reward_model: str | None

    @classmethod
    def load(cls, args: ChatArguments) -> "ChatSession":
        specs = select_policies(args.run_dir, args.policies, args.compare)
        args.sampling().check()  # bad sampling flags fail before minutes of loading
        reward_model = default_reward_model(args)
        policies = [(policy, load_policy_tokenizer(policy.path, args.trust_remote_code))
                    for policy in load_policies(specs, args.dtype, args.device, args.trust_remote_code)]
        device = policies[0][0].device
        set_torch_threads(args.num_threads, device, sum(p.numel() for p in policies[0][0].model.parameters()))
        reward_fn = None
        if reward_model is not None:
            # deferred: imports the reward modeling stack
            from ..reward_scoring import RewardFunction

            # the text path, as in reward training: policies may not share the reward model's tokenizer
            reward_fn = RewardFunction.from_pretrained(reward_model, dtype=args.dtype, device=device,
                                                       trust_remote_code=args.trust_remote_code, fast_path="off")
        for policy, _ in policies:
            logger.info("%s: %s (%s)", policy.name, policy.path, policy.kind)
        return cls(policies, reward_fn, reward_model)

    @property
    def names(self) -> list[str]:
        return [policy.name for policy, _ in self.policies]

    def streams(self, question: str, settings: SamplingSettings, stream: bool = True) -> Iterator[AnswerStream]:
        """One `AnswerStream` per policy, in order, each seeded alike (iterate one before taking the next)."""
        for policy, tokenizer in self.policies:
            yield AnswerStream(policy, tokenizer, question, settings, self.reward_fn, stream=stream)

    def answers(self, question: str, settings: SamplingSettings) -> list[Answer]:
        """Every policy's whole answer (no streaming)."""
        out = []
        for answer_stream in self.streams(question, settings, stream=False):
            for _ in answer_stream:
                pass
            out.append(answer_stream.answer)
        return out
