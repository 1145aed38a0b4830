"""The pipeline driver: every stage of the recipe, in order, in one run folder.

    prepare -> tiny model -> SFT -> merge -> reward model -> merge -> PPO -> merge -> evaluation

Written here because no library of the field runs a multi-stage training recipe with resume.
Each stage is a subprocess running that stage's own script with the same flags a user would
type, so a stage behaves exactly as when run by hand, and on a multi-GPU machine the training
stages are wrapped in `accelerate launch` or `torchrun`.

Resume: a stage is complete when its completion marker (the results file its script writes
last) exists and the driver's record says it was made by the same command, the same config
file contents and the same upstream outputs. Complete stages are reused, so a re-run after a
failure resumes at the failed stage; a stage whose command, config or inputs changed runs
again, and so does every stage after it. `--force` redoes everything.

A merge stage runs only when the stage before it saved a LoRA adapter; with full weights
(the tiny default trains in full) the next stages read the stage's folder directly.

- `stages`: the stage table (`StageSpec`, `STAGES`);
- `arguments`: the driver's flags and the check of the per-stage settings;
- `plan`: a stage's command line and fingerprint (`Step`, `plan_step`);
- `reuse`: the driver's records and whether a stage's output can be reused;
- `logged_run`: a stage's subprocess and its log; `progress`: the headline of each stage;
- `live`: the running stage's progress line, read from the tqdm bars in its output;
- `runner`: the loop over the stages (`run_pipeline`) and `pipeline_results.json`.
"""

from ..errors import PipelineError
from .arguments import LAUNCHERS, PipelineArguments, check_config, with_default_config
from .plan import Step, plan_step
from .reuse import STATE_DIR
from .runner import run_pipeline
from .stages import STAGE_NAMES, STAGES, StageSpec

__all__ = ["LAUNCHERS", "STAGES", "STAGE_NAMES", "STATE_DIR", "PipelineArguments", "PipelineError", "StageSpec",
           "Step", "check_config", "plan_step", "run_pipeline", "with_default_config"]
