"""Ask a trained policy questions in the terminal, the recipe's way: the `Question: ...\\n\\nAnswer: `
prompt, sampling as the PPO stage samples (flags to change it), the answer streamed as it is
generated, then the reward model's score and the answer's length.

After `make demo` (the run folder runs/tiny), no flag is needed:
```bash
python scripts/chat.py                                    # interactive: the PPO policy answers
python scripts/chat.py --question "How do I brew cold brew coffee?" --compare   # SFT and PPO, scored
python scripts/chat.py --policies sft --temperature 0.7 --max_new_tokens 64
python scripts/chat.py --run_dir runs/llama-7b --compare --dtype bfloat16
echo "Why does my espresso taste sour?" | python scripts/chat.py --compare
```
`--policies` also takes model folders, LoRA adapter folders (loaded over their recorded base; an
adapter over another policy's weights shares them in memory) and Hub ids.
"""

import stackllama  # noqa: F401  first: quiets library warnings that do not concern this run (library_warnings)

# isort: split
from stackllama.chat import ChatArguments, ChatSession, chat
from stackllama.stage import run_script


def main(args: ChatArguments) -> int:
    session = ChatSession.load(args)
    return chat(session, args.question, args.sampling())


if __name__ == "__main__":
    run_script(main, [ChatArguments], __doc__)
