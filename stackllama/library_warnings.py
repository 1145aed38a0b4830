"""Warnings of the libraries that do not concern the user's run, held back until they do.

bitsandbytes' CPU backend, on a CPU with AVX512-BF16, tries at import to load a faster CPU 4-bit
kernel from the Hub (`kernels-community/quantization-bitsandbytes`, through the `kernels`
package) and logs a warning when it cannot. peft imports bitsandbytes, so every script printed
it, though only a 4-bit base on the CPU would use that kernel. Importing `stackllama` installs a
filter (without importing bitsandbytes) that holds the message back; `explain_cpu_4bit_kernel`,
called where a 4-bit base is loaded on the CPU, logs it once, explained. A process that imported
bitsandbytes before stackllama has printed it already.
"""

from __future__ import annotations

import logging
import os

from .offline import NO_HUB_KERNEL

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNEL_WARNING_START = "Failed to load CPU gemm_4bit_forward"

logger = logging.getLogger(__name__)


class HeldBackKernelWarning(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward" record and remembers why it failed."""

    def __init__(self):
        super().__init__()
        self.reason: str | None = None  # set when bitsandbytes could not load the kernel
        self.explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(KERNEL_WARNING_START):
            return True
        self.reason = str(record.args[0]) if isinstance(record.args, tuple) and record.args else record.getMessage()
        return False

    def explain(self) -> None:
        """Log, once, what the held-back warning means for a 4-bit base on the CPU (nothing if there was none)."""
        if self.reason is None or self.explained:
            return
        self.explained = True
        if "No module named 'kernels'" in self.reason:
            why, enable = "the `kernels` package is not installed", "`pip install kernels` and network access to the Hub"
        elif os.environ.get("LOCAL_KERNELS") == NO_HUB_KERNEL:
            why = "stackllama keeps bitsandbytes' import-time lookup of it off the Hub (no traffic you did not ask for)"
            enable = ("LOCAL_KERNELS pointing kernels-community/quantization-bitsandbytes at a local copy "
                      "(stackllama sets it only when unset, see stackllama/offline.py)")
        else:
            why, enable = self.reason, "`pip install kernels` and network access to the Hub"
        logger.warning(
            "4-bit on the CPU: bitsandbytes' optional faster CPU 4-bit kernel (from the Hub, through the `kernels` "
            "package) is not loaded: %s. bitsandbytes uses its built-in CPU kernel instead, which is slower; "
            "to load the faster one: %s.", why, enable)


_KERNEL_WARNING = HeldBackKernelWarning()


def hold_back_library_warnings() -> None:
    """Install the filter on bitsandbytes' CPU-backend logger (it need not be imported yet). Idempotent."""
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_KERNEL_WARNING)


def explain_cpu_4bit_kernel() -> None:
    """Called where a 4-bit base is loaded on the CPU: bitsandbytes is imported now (its import is when it
    tries the kernel), then the held-back warning, if any, is logged once, explained."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return  # the load itself reports it
    _KERNEL_WARNING.explain()
