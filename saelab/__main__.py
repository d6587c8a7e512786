"""`python -m saelab ...`: the saelab command, also what torchrun starts (`torchrun --nproc_per_node N -m saelab
train ...`); the process group, if any, is left when the command ends."""

import os
import sys

from saelab import distributed
from saelab.cli import main

try:
    code = main()
finally:
    distributed.finish()
if distributed.launched():
    # gloo's worker threads can abort the interpreter's own shutdown (SIGABRT, "terminate called without an
    # active exception") after the work is done and reported: a rank leaves without it, with its own exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
