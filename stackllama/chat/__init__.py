"""Talking to the trained policies: `scripts/chat.py` in the terminal, `scripts/demo_app.py` in a browser.

- `policies`: the trained policies of a run folder (loaded by `evaluation.policies`, bases shared);
- `answer`: one policy's streamed answer, with its reward score and length (`SamplingSettings`, `AnswerStream`);
- `session`: the policies and reward model loaded once, every policy asked the same question alike;
- `terminal`: the chat command's questions and printout; `web`: the Gradio app (optional extra `[demo]`);
- `arguments`: the flags of both scripts.
"""

from .answer import Answer, AnswerStream, SamplingSettings, answer_question
from .arguments import ChatArguments, DemoArguments
from .policies import find_policies, select_policies
from .session import ChatSession
from .terminal import answer_all, chat, comparison_table, questions

__all__ = [
    "Answer", "AnswerStream", "ChatArguments", "ChatSession", "DemoArguments", "SamplingSettings",
    "answer_all", "answer_question", "chat", "comparison_table", "find_policies", "questions", "select_policies",
]
