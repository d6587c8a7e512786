"""Train SAEs from a script (the same flags as `saelab train`; see --help).

    python scripts/train_sae.py --acts runs/acts --arch topk --width 4608 --k 32 --tokens 2M --out runs/sae
    python scripts/train_sae.py --config run.yaml
"""

import sys

from saelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
