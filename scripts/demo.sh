#!/usr/bin/env bash
# The main job on the committed demo model: export it, generate a 1,000,000-token
# memorization input with the fact at the start, run it, check the answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${RMT_VENV:-.venv}/bin/activate"
rmt-export examples/demo-rmt.pt -o out/demo-export
rmt-demo generate out/demo-input --tokens 1000000 --samples 1 --seed 2026
result=$(rmt-run out/demo-export out/demo-input/sample_00000.txt)
echo "$result"
answer=$(echo "$result" | sed -n 's/^answer: \([a-z]*\).*/\1/p')
expected=$(cut -f2 out/demo-input/answers.tsv)
if [ "$answer" = "$expected" ]; then
    echo "correct: the fact at token 0 was '$expected'"
else
    echo "WRONG: expected '$expected', got '$answer'" >&2
    exit 1
fi
