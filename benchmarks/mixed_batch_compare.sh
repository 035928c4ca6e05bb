#!/bin/bash
# LoRA's mixed-batch ratios before and after a change of the code under them (issue 13 §1: the method
# contract and the layout move must leave them unchanged within noise). Runs benchmarks/mixed_batch.py
# (decode, U in {1, 8, 32}, 5 reps, 2 threads) in checkout OLD and in checkout NEW, alternated twice,
# each with its own src/ first on the path; raw results go to OUT/{old,new}_{1,2}.json.
#   benchmarks/mixed_batch_compare.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR
set -e
old=$(realpath "$1"); new=$(realpath "$2"); out=$(realpath "$3"); py=${PYTHON:-$new/.venv/bin/python}
mkdir -p "$out"
for round in 1 2; do
  for side in old new; do
    tree=$old; [ $side = new ] && tree=$new
    (cd "$tree" && PYTHONPATH="$tree/src" "$py" benchmarks/mixed_batch.py --workloads decode --us 1,8,32 --reps 5 \
       --threads 2 --out "$out/${side}_$round.json")
  done
done
