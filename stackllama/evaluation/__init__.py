"""Comparing the SFT and PPO policies on held-out questions: the pieces behind `scripts/evaluate.py`.

Both policies answer the same prompts of the `evaluation` subset (never seen in training), the
reward model scores every answer, and the statistics say how sure the difference is:

- `arguments`: the script's flags; `inputs`: flags + run folder + PPO run -> `EvaluationInputs`;
- `policies`: loading both policies (a PPO adapter over the SFT weights once, SFT = adapter disabled);
- `sampling`: the prompts, one response length per (prompt, sample) shared by both policies, and
  sampling as PPO samples, each batch seeded alike for both policies (less noise in the difference);
- `scoring`: the reward model's scores and its accuracy on the held-out pairs;
- `kl`: KL(PPO || SFT) on the PPO policy's own samples;
- `statistics`: paired figures with bootstrap intervals over prompts;
- `samples`: the per-answer rows (`evaluation_samples.jsonl`);
- `compare`: `evaluate_policies`, all of the above in order.
"""

from .arguments import EvaluateScriptArguments
from .compare import evaluate_policies
from .inputs import EvaluationInputs, resolve_inputs
from .kl import kl_per_response, response_logprobs
from .policies import Policy, PolicySpec, load_policies
from .samples import SAMPLES_FILE, read_samples, write_samples
from .sampling import generate_responses, sample_lengths
from .statistics import bootstrap_ci, paired_comparison, response_stats

__all__ = [
    "SAMPLES_FILE",
    "EvaluateScriptArguments",
    "EvaluationInputs",
    "Policy",
    "PolicySpec",
    "bootstrap_ci",
    "evaluate_policies",
    "generate_responses",
    "kl_per_response",
    "load_policies",
    "paired_comparison",
    "read_samples",
    "resolve_inputs",
    "response_logprobs",
    "response_stats",
    "sample_lengths",
    "write_samples",
]
