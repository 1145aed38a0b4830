"""A local web demo of the trained policies: ask a question in the browser, and every policy of the
run (SFT, PPO, and any other stage's) answers side by side, streaming, each answer with its reward
score and length, with sampling controls and example questions from the held-out subset.

Needs the optional extra: `pip install -e ".[demo]"` (Gradio). After `make demo`, no flag is needed:
```bash
python scripts/demo_app.py                           # http://127.0.0.1:7860, runs/tiny's policies
python scripts/demo_app.py --run_dir runs/llama-7b --dtype bfloat16 --server_port 8080
python scripts/demo_app.py --policies ppo --reward_model runs/tiny/reward
```
It binds to this machine only (127.0.0.1) unless `--server_name 0.0.0.0` says otherwise, and sends
no usage statistics. Ctrl-C stops it.
"""

import stackllama  # noqa: F401  first: quiets library warnings that do not concern this run (library_warnings)

# isort: split
from stackllama.chat import ChatSession, DemoArguments
from stackllama.chat.web import build_app, example_questions, import_gradio
from stackllama.stage import run_script


def main(args: DemoArguments) -> int:
    import_gradio()  # a missing extra is said before minutes of loading
    session = ChatSession.load(args)
    app = build_app(session, args.run_dir, example_questions(args.run_dir, args.num_examples), args.sampling())
    app.queue().launch(server_name=args.server_name, server_port=args.server_port, share=args.share)
    return 0


if __name__ == "__main__":
    run_script(main, [DemoArguments], __doc__)
