"""Worker for test_launch_helpers.py: two processes over gloo (torchrun), the last collective
finished just as rank 1 reaches its end, so that gloo's worker thread frees that collective's
tensor (it owns its Python object: it has an attribute and Python has dropped it) while rank 1
is leaving.

argv: `finalize`: rank 1 ends the usual way, with the interpreter's finalization; `end_process`:
through stackllama.processes.end_process, as every script and test worker does.
"""

import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
x = torch.ones(1000)
out = [torch.zeros(1, 1000) for _ in range(dist.get_world_size())]
view = x[None]
view.tag = "Python state"  # torch keeps this tensor's Python object alive, owned by the tensor, once Python drops it
work = dist.all_gather(out, view, async_op=True)
del view, x, out, work  # gloo's worker thread drops the last reference when the gather is done
if dist.get_rank() == 0:
    time.sleep(0.5)  # rank 1 leaves first
if sys.argv[1] == "end_process":
    from stackllama.processes import end_process

    end_process()
