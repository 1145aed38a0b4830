"""This process's place in a run, and how it ends.

The processes started by ``torchrun`` / ``accelerate launch`` join one run on a machine
without GPU too (gloo), and each quantized model goes to its own process's device. Every
script ends through :func:`end_process`, which is what keeps a gloo run from aborting at exit.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def accelerator_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def launched_with(engine: str) -> bool:
    """Whether `accelerate launch` started this process with `engine` ("DEEPSPEED" or "FSDP"): the
    `ACCELERATE_USE_<engine>` flag it sets, read as accelerate reads it."""
    return parse_flag_from_env(f"ACCELERATE_USE_{engine}")


def process_state():
    """This process's place in the run (accelerate's `PartialState`), set up so that the processes
    started by `torchrun` / `accelerate launch` join one run on a machine without GPU too.

    There accelerate needs `cpu=True` (a bare `PartialState()` makes each process a separate
    single-process run), except under a DeepSpeed launch, where `cpu=True` switches DeepSpeed
    off: accelerate knows DeepSpeed on GPUs only, so the processes join over gloo instead (how
    the tests run ZeRO-2/3 on CPU). Call it before the first `Accelerator`."""
    if accelerator_available():
        return PartialState()
    if launched_with("DEEPSPEED") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return PartialState(backend="gloo")
    return PartialState(cpu=True)


def end_process(status: int = 0, message: str | None = None) -> None:
    """Ends this process with `status` (and `message` on stderr, last) once its part of the run is
    done; in a multi-process run over gloo (CPU, what the tests and laptops run), without the
    interpreter's finalization.

    gloo frees each finished collective's tensors in its own worker thread (`pt_gloo_runloop`),
    shortly after the collective has returned to Python. A tensor that Python has dropped but
    gloo still held owns its Python object, so the thread takes the GIL to release it. Once the
    interpreter is finalizing, CPython ends every thread that asks for the GIL with
    `pthread_exit`, whose unwinding through the (noexcept) tensor destructor calls
    `std::terminate`: "terminate called without an active exception", SIGABRT, after every
    output was written, whenever the main thread reaches the end of a script within that window
    (on a loaded machine, often enough to notice: benchmarks/RESULTS.md). gloo has no shutdown,
    and its groups live as long as the DDP or DeepSpeed objects holding them, so destroying the
    group does not stop the thread; leaving without finalization does. Everything is written
    first: the process group destroyed, logging and the standard streams flushed. Elsewhere
    (one process; NCCL, whose backend `destroy_process_group` shuts down) this returns for
    status 0 without a message and exits the usual way otherwise (`sys.exit`)."""
    if not _joined_over_gloo():
        if status or message is not None:
            sys.exit(message if message is not None else status)
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    if message is not None:
        print(message, file=sys.stderr)
    sys.stderr.flush()
    os._exit(status)


def _joined_over_gloo() -> bool:
    """Whether this process is one of several joined over gloo (torch's record while the group
    exists, accelerate's after `end_training` destroyed it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_available() and dist.is_initialized():
        return dist.get_backend() == "gloo"
    return PartialState._shared_state.get("backend") == "gloo"


def kbit_device_map() -> dict[str, int | str]:
    """Where a quantized model goes: this process's own device (one full copy per process), or the CPU."""
    if not accelerator_available():
        return {"": "cpu"}
    return {"": PartialState().local_process_index}
