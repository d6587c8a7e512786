#!/usr/bin/env bash
# Move the pins to today's releases, only if the fast tier passes on them: rewrites scripts/constraints.txt from
# .venv-latest. Then run `bash .ci/run` from a fresh clone and commit the file with the versions in the message.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/check_latest.sh
{
  sed -n '/^#/p' scripts/constraints.txt | sed "s/the day they were taken: .*/the day they were taken: $(date +%F)./"
  .venv-latest/bin/pip freeze --all 2>/dev/null | grep -v -e '^-e ' -e '^# ' -e '^saelab' | sed 's/+cpu$//' | sort -f
} > scripts/constraints.txt.new
mv scripts/constraints.txt.new scripts/constraints.txt
git --no-pager diff --stat scripts/constraints.txt
