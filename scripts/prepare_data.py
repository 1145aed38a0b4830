"""Stage 1: Stack Exchange data dumps -> preference and paired datasets.

    python scripts/prepare_data.py                                   # the bundled sample
    python scripts/prepare_data.py --dumps cs.stackexchange.com.7z --output_dir runs/cs/data
    python scripts/prepare_data.py --config configs/data/stackexchange.yaml

Each dump is a Posts.xml, a folder holding one (and maybe Users.xml), or the site's .7z
archive; `SITE=PATH` names the site when the path does not. The output folder holds
`preferences/` (one row per question) and `pairs/{finetune,reward,rl,evaluation}/`, loadable
with `datasets.load_dataset(output_dir, "pairs", split="finetune")`.
"""

import stackllama  # noqa: F401  first: it holds back library warnings that do not concern the run (library_warnings.py)

# isort: split
from dataclasses import dataclass, field

from stackllama.data.prepare import (
    PrepareOptions,
    bundled_dumps,
    format_summary,
    prepare_dataset,
)
from stackllama.stage import run_script


@dataclass
class ScriptArguments:
    dumps: list[str] = field(default_factory=bundled_dumps, metadata={
        "help": "Stack Exchange dumps: each a Posts.xml, a folder holding one, a site .7z archive, or SITE=PATH. "
                "Default: the sample bundled in data/stackexchange (coffee, beer, matheducators)."})
    output_dir: str = field(default="runs/tiny/data", metadata={"help": "Folder to write the datasets into."})
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir if it exists (only once the new "
                                                              "output is complete)."})


def main(script_args: ScriptArguments, options: PrepareOptions) -> None:
    summary = prepare_dataset(script_args.dumps, script_args.output_dir, options, overwrite=script_args.overwrite)
    print(format_summary(summary))
    print(f"wrote {script_args.output_dir} in {summary['seconds']['total']:.1f}s")


if __name__ == "__main__":
    run_script(main, (ScriptArguments, PrepareOptions), __doc__)
