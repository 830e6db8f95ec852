"""Started by tests/test_faults.py: `dmd2lab distill` (argv as the command line's) in a process that kills itself
with SIGKILL halfway through writing its second checkpoint's weights file (the first one completes), as a kill -9 or
a power cut would leave it: a torn file in a temporary folder."""
import os
import signal
import sys

from safetensors.torch import save

from dmd2lab import train
from dmd2lab.cli import main

calls = []


def save_file_then_die(tensors, path, metadata=None):
    calls.append(path)
    data = save(tensors, metadata)
    with open(path, "wb") as f:
        f.write(data if len(calls) < 2 else data[:len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)


train.save_file = save_file_then_die
sys.exit(main(sys.argv[1:]))
