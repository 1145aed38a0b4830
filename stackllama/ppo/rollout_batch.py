"""The rollout batch: how (query, response) pairs are laid out for every forward pass, and where
a sampled response stops. One home for both, used by the trainer and by the evaluation.

Layout: queries left-padded to ``Q`` and responses right-padded to ``R`` in one ``(B, Q + R)``
tensor, so the response of every row starts at column ``Q`` and the logits that predict it
are the contiguous slice ``[Q - 1, Q + R - 1)``; the LM head is applied to that slice only (no
logits for the prompt), and each chunk of rows is trimmed to its own longest query/response
(:meth:`RolloutBatch.rows`).

Stops: a response ends after its first EOS, or after its first stop token at position
``stop_after`` or later (:class:`StopTokens`); the stop token is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


def left_pad(seqs: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``seqs`` aligned on the right, as ``generate`` needs."""
    lens = torch.tensor([len(s) for s in seqs], device=seqs[0].device)
    width = int(lens.max())
    ids = torch.nn.utils.rnn.pad_sequence([s.flip(0) for s in seqs], batch_first=True, padding_value=pad_token_id).flip(1)
    mask = (torch.arange(width, device=ids.device)[None, :] >= (width - lens)[:, None]).long()
    return ids, mask


def right_pad(seqs: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of ``seqs`` aligned on the left (responses)."""
    lens = torch.tensor([len(s) for s in seqs], device=seqs[0].device)
    ids = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad_token_id)
    mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lens[:, None]).long()
    return ids, mask


@dataclass(frozen=True)
class StopTokens:
    """Where a response may stop: an EOS anywhere; a stop token from position ``stop_after`` on."""

    eos_ids: Sequence[int]
    stop_ids: Sequence[int] = ()
    stop_after: int = 0

    def mask(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """True where ``tokens`` (B, L) may stop; ``positions``: each column's position in its
        response (default ``0 .. L-1``)."""
        stop = torch.isin(tokens, torch.tensor(list(self.eos_ids), dtype=tokens.dtype, device=tokens.device))
        if self.stop_ids:
            if positions is None:
                positions = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
            late = positions >= self.stop_after
            stop |= torch.isin(tokens, torch.tensor(list(self.stop_ids), dtype=tokens.dtype, device=tokens.device)) & late
        return stop

    def truncate(self, generated: torch.Tensor, max_lengths: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Each row of ``generated`` (B, L) cut after its first stop (kept), and to at most
        ``max_lengths[i]`` tokens (vectorised search, one slice per row)."""
        stop = self.mask(generated)
        limit = torch.full((generated.shape[0],), generated.shape[1], device=generated.device)
        if max_lengths is not None:
            limit = torch.minimum(limit, torch.tensor(list(max_lengths), device=generated.device))
            stop &= torch.arange(generated.shape[1], device=generated.device)[None, :] < limit[:, None]
        first = stop.float().argmax(dim=1)
        lengths = torch.where(stop.any(dim=1), first + 1, limit).tolist()
        return [row[:n] for row, n in zip(generated, lengths)]

    def ended(self, responses: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B,) whether each response ends with EOS or a stop token (else it was cut by length)."""
        last = torch.stack([r[-1:] for r in responses])  # (B, 1)
        pos = torch.tensor([len(r) - 1 for r in responses], device=last.device)[:, None]
        return self.mask(last, pos)[:, 0]


@dataclass
class RolloutBatch:
    """One PPO batch in the shared layout (see module docstring)."""

    input_ids: torch.Tensor  # (B, Q + R)
    attention_mask: torch.Tensor  # (B, Q + R)
    mask: torch.Tensor  # (B, R) float, 1 on response tokens
    query_lens: list = field(default_factory=list)
    response_lens: list = field(default_factory=list)
    q_width: int = 0  # Q

    @classmethod
    def build(cls, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], pad_token_id: int) -> "RolloutBatch":
        q_ids, q_mask = left_pad(queries, pad_token_id)
        r_ids, r_mask = right_pad(responses, pad_token_id)
        return cls(
            input_ids=torch.cat([q_ids, r_ids], dim=1),
            attention_mask=torch.cat([q_mask, r_mask], dim=1),
            mask=r_mask.float(),
            query_lens=[len(q) for q in queries],
            response_lens=[len(r) for r in responses],
            q_width=q_ids.shape[1],
        )

    def rows(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(input_ids, attention_mask, q, r)`` of ``rows``, trimmed to their longest query ``q``
        and response ``r``: the logits predicting their responses are columns ``[q - 1, q + r - 1)``."""
        q = max(self.query_lens[i] for i in rows)
        r = max(self.response_lens[i] for i in rows)
        Q = self.q_width
        idx = torch.as_tensor(rows, device=self.input_ids.device)
        return self.input_ids[idx, Q - q : Q + r], self.attention_mask[idx, Q - q : Q + r], q, r

    def response_ids(self, rows: Sequence[int], r: int) -> torch.Tensor:
        """The response tokens of ``rows``, their first ``r`` columns (the labels of the logits)."""
        idx = torch.as_tensor(rows, device=self.input_ids.device)
        return self.input_ids[idx, self.q_width : self.q_width + r]
