#!/usr/bin/env bash
# Interleaved A/B of a benchmark between an earlier commit and the working tree, so a busy machine cannot favour
# one side: `scripts/bench_ab.sh REV [ROUNDS] [-- BENCH ARGS]` runs scripts/bench_train.py (or BENCH=...) ROUNDS
# times on each side, alternating, and prints each run's RESULT line. REV is checked out in a temporary worktree
# and imported from there (PYTHONPATH), with this checkout's venv.
set -euo pipefail
rev=${1:?usage: scripts/bench_ab.sh REV [ROUNDS] [-- BENCH ARGS]}
rounds=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
[ "${1:-}" = "--" ] && shift
here=$(cd "$(dirname "$0")/.." && pwd)
bench=${BENCH:-scripts/bench_train.py}
old=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$old" >/dev/null 2>&1 || true' EXIT
git -C "$here" worktree add --detach --force "$old" "$rev" >/dev/null
for i in $(seq "$rounds"); do
  for side in before after; do
    dir=$here; [ $side = before ] && dir=$old
    echo "== $side ($([ $side = before ] && echo "$rev" || echo "working tree")) run $i, load $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$dir" && PYTHONPATH="$dir" "$here/.venv/bin/python" "$bench" "$@" 2>&1 | grep -E "^RESULT")
  done
done
