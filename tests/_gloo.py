"""Run a test body on several CPU processes joined in a gloo process group."""
import datetime
import os
import socket
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, body, world, port, errfile, args):
    try:
        torch.set_num_threads(1)
        # a rank that fails leaves the others in a collective: they time out instead of hanging
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120))
        body(rank, world, *args)
        dist.barrier()
        code = 0
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        code = 1
    # Exit without tearing the group down. In older torch (2.4.1 among them; fixed by
    # pytorch/pytorch#154976) the gloo group's destructor joins its worker threads while holding
    # the GIL, and a worker still freeing a finished collective's tensors waits for the GIL:
    # destroy_process_group(), or the interpreter's shutdown, which destroys the group too, then
    # hangs for good (a failed rank too, which would then time out instead of reporting).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


WORKERS_TIMEOUT_S = 600  # a whole run (spawning, imports, the body); the collectives time out sooner


def run_gloo(body, world: int, *args) -> None:
    """Call ``body(rank, world, *args)`` (a module-level function) in ``world`` spawned processes;
    fail the test with every failing rank's traceback, or when the workers outlast
    ``WORKERS_TIMEOUT_S`` (they are killed: a stuck worker never hangs the suite)."""
    with tempfile.TemporaryDirectory() as tmp:
        errfile = os.path.join(tmp, "err")
        ctx = mp.start_processes(_entry, args=(body, world, _free_port(), errfile, args),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + WORKERS_TIMEOUT_S
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"gloo workers still running after {WORKERS_TIMEOUT_S} s: killed")
        except Exception:
            msgs = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp))]
            pytest.fail("worker failed:\n" + "\n".join(msgs))
