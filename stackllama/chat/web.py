"""The web demo: a Gradio page where every trained policy of a run answers the same question side by
side, streaming, each answer with its reward score and length. Gradio is the optional extra `[demo]`.

The page is built around a `ChatSession` (the policies loaded once); the answering function is also
Gradio's API endpoint `/answer`, so `gradio_client` gets what the page shows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

from .. import run_layout
from ..errors import InputError, MissingDependencyError
from .answer import SamplingSettings
from .session import ChatSession

logger = logging.getLogger(__name__)

TITLE = "StackLLaMA: ask the trained policies"
WAITING = "…"  # an answer box's text until its policy's turn


def import_gradio():
    """Gradio, or a one-line error saying how to install the extra."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage report from a local demo
    try:
        import gradio
    except ImportError as error:
        raise MissingDependencyError(f"the web demo needs Gradio: pip install -e \".[demo]\" ({error})") from error
    return gradio


def example_questions(run: str | Path, count: int, max_chars: int = 300, seed: int = 0) -> list[str]:
    """Up to `count` short questions of the run's held-out `evaluation` subset (none without data)."""
    if count < 1:
        return []
    from ..data.loading import load_pairs  # deferred: datasets is slow to import

    try:
        pairs = load_pairs(Path(run) / run_layout.DATA, "evaluation")
    except (OSError, ValueError) as error:
        logger.info("no example questions: %s", error)
        return []
    unique = sorted({q.strip() for q in pairs["question"] if 0 < len(q.strip()) <= max_chars})
    import random

    return random.Random(seed).sample(unique, min(count, len(unique)))


def answer_columns(session: ChatSession, question: str, settings: SamplingSettings) -> Iterator[list[str]]:
    """What the page shows as generation goes: `[answer_1, ..., answer_n, summary_1, ..., summary_n]`,
    policies answering in turn, each streaming; a summary (score, length) once its answer is done."""
    n = len(session.policies)
    texts, summaries = [WAITING] * n, [""] * n
    for i, stream in enumerate(session.streams(question, settings)):
        texts[i] = ""
        for piece in stream:
            texts[i] += piece
            yield texts + summaries
        texts[i] = stream.answer.text
        summaries[i] = stream.answer.summary()
        yield texts + summaries


def build_app(session: ChatSession, run: str, examples: list[str], defaults: SamplingSettings):
    """The page: question box, sampling controls, one column per policy, example questions."""
    gr = import_gradio()

    def answer(question, max_new_tokens, temperature, top_k, top_p, do_sample, seed):
        settings = SamplingSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                    top_k=int(top_k), top_p=float(top_p), do_sample=bool(do_sample), seed=int(seed))
        try:
            yield from answer_columns(session, question or "", settings)
        except InputError as error:
            raise gr.Error(str(error)) from error  # shown on the page, not as a traceback

    scorer = (f"scored by the reward model `{session.reward_model}`" if session.reward_model
              else "no reward model found: answers are not scored")
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\nRun `{run}`: {', '.join(session.names)}, {scorer}. Each policy answers the "
                    f"recipe's prompt `Question: …\\n\\nAnswer: ` with the same seed.")
        with gr.Row():
            question = gr.Textbox(label="Question", lines=3, scale=4, elem_id="question",
                                  placeholder="How do I brew cold brew coffee?")
            submit = gr.Button("Answer", variant="primary", scale=1, elem_id="answer-button")
        with gr.Accordion("Sampling", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(1, 512, value=defaults.max_new_tokens, step=1, label="max new tokens")
                temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="temperature")
                top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top k (0 = off)")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top p (1 = off)")
            with gr.Row():
                do_sample = gr.Checkbox(value=defaults.do_sample, label="sample (off: greedy)")
                seed = gr.Number(value=defaults.seed, precision=0, label="seed")
        answers, summaries = [], []
        with gr.Row():
            for name in session.names:
                with gr.Column():
                    answers.append(gr.Textbox(label=name, lines=8, interactive=False, elem_id=f"answer-{name}"))
                    summaries.append(gr.Markdown(elem_id=f"summary-{name}"))
        if examples:
            gr.Examples(examples=[[q] for q in examples], inputs=[question], label="Held-out questions")
        inputs = [question, max_new_tokens, temperature, top_k, top_p, do_sample, seed]
        gr.on([submit.click, question.submit], answer, inputs=inputs, outputs=answers + summaries, api_name="answer")
    return app
