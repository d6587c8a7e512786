"""Cache activations from a script (the same flags as `saelab cache`; see --help). Re-run to resume.

    python scripts/cache_activations.py --model smollm2-135m --hooks 'blocks.{9,15}.hook_resid_post' \
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --tokens 300k --out runs/acts
"""

import sys

from saelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))
