"""The prompt template every stage shares (SFT text, reward-model input, PPO queries).

Defined once here so that the SFT model, the reward model and the PPO policy all see
exactly the same text layout as in the published StackLLaMA scripts.
"""

PROMPT_TEMPLATE = "Question: {question}\n\nAnswer: "


def format_prompt(question: str) -> str:
    """`Question: <question>\\n\\nAnswer: ` - the query the policy answers."""
    return PROMPT_TEMPLATE.format(question=question)


def format_example(question: str, answer: str) -> str:
    """`Question: <question>\\n\\nAnswer: <answer>` - one SFT text or one reward-model input."""
    return format_prompt(question) + answer
