"""The whole recipe in one command: prepare -> tiny model -> SFT -> merge -> reward model -> PPO -> evaluation.

    python scripts/run_pipeline.py                                          # the tiny default on CPU (runs/tiny)
    python scripts/run_pipeline.py --config configs/pipeline/llama-7b.yaml --dry_run   # the commands of the real run
    python scripts/run_pipeline.py --config configs/pipeline/llama-7b.yaml             # run them (8 GPUs)
    python scripts/run_pipeline.py --from_stage ppo                         # redo PPO and what follows it

Every stage runs its own script (`scripts/<stage>.py`) in a subprocess, writes one sub-folder of
the run folder (`--output_dir`), and logs to `<output_dir>/logs/<stage>.log`. A stage whose
output is complete and was made by the same command, config and inputs is reused, so running
the same command again after a failure resumes at the failed stage; `--force` redoes all.
Without --config, configs/pipeline/tiny.yaml is used.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
import sys

from stackllama.pipeline import (
    PipelineArguments,
    check_config,
    run_pipeline,
    with_default_config,
)
from stackllama.stage import run_script


def main(args: PipelineArguments) -> int:
    settings = check_config(args)
    return run_pipeline(args, settings, out=lambda line: print(line, flush=True))


if __name__ == "__main__":
    run_script(main, (PipelineArguments,), __doc__, args=with_default_config(sys.argv[1:]))
