"""No network call unless the user points a stage at the Hub.

The libraries phone home on their own: `datasets` sends a request to S3 each time it loads a
local parquet folder (a download counter), and `huggingface_hub` sends usage telemetry from
a background thread when a trainer starts. Neither is needed to train, both fail (quietly,
after a timeout) on a machine without network, and a user who asked for no download should
not see traffic. Importing `stackllama` opts out of both, unless the user set the variables
themselves, and keeps bitsandbytes' import-time kernel lookup off the Hub (`NO_HUB_KERNEL`) in
the processes it starts (a process that imported bitsandbytes before stackllama has made it).
Hub downloads the user asks for (a model or dataset id) are unaffected.
"""

from __future__ import annotations

import os
import sys

# bitsandbytes' CPU backend asks the Hub for a 4-bit kernel at import (through the `kernels`
# package, when installed: transformers pulls it in), which `kernels` then refuses to load without
# trust_remote_code, and falls back to its own. Pointing that repository at a path that cannot
# exist keeps the lookup local (bitsandbytes falls back the same way), with no traffic.
NO_HUB_KERNEL = "kernels-community/quantization-bitsandbytes=/dev/null/no-hub-kernel"
OPT_OUTS = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "LOCAL_KERNELS": NO_HUB_KERNEL}


def disable_telemetry() -> None:
    """Set the opt-outs (for libraries not imported yet and for child processes) and apply them to
    libraries already imported, which read the variables once at import."""
    for name, value in OPT_OUTS.items():
        os.environ.setdefault(name, value)
    telemetry_off = os.environ["HF_HUB_DISABLE_TELEMETRY"].upper() in ("1", "ON", "YES", "TRUE")
    counts_off = os.environ["HF_UPDATE_DOWNLOAD_COUNTS"].upper() in ("0", "OFF", "NO", "FALSE")
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None and telemetry_off:
        hub_constants.HF_HUB_DISABLE_TELEMETRY = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and counts_off:
        datasets_config.HF_UPDATE_DOWNLOAD_COUNTS = False
