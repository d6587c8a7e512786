"""`python -m saelab ...`: the saelab command, also what torchrun starts (`torchrun --nproc_per_node N -m saelab
train ...`); the process group, if any, is left when the command ends."""

import sys

from saelab import distributed
from saelab.cli import main

try:
    code = main()
finally:
    distributed.finish()
sys.exit(code)
