#!/usr/bin/env bash
# The serving results of experiments/serving/README.md: train (or resume), the early-exit sweep, the export,
# and the latency of every artifact, for the default parity chain and the Fashion-MNIST CNN.
#
#   bash experiments/serving/run.sh [runs/serving]
#
# from the repository root, with the export extra (`pip install -e '.[export]'`) and, for Fashion-MNIST,
# after `python -m chainjax.data.prepare fashion_mnist` (README, "Fashion-MNIST, offline").
set -euo pipefail
W=${1:-runs/serving}
PY=${PYTHON:-python}
for task in default fmnist; do
  case $task in
    default) config=configs/default.py ;;
    fmnist) config=configs/fashion_mnist_cnn.py ;;
  esac
  "$PY" -m chainjax.main --config="$config" --workdir="$W/$task"
  "$PY" -m chainjax.main --config="$config" --workdir="$W/$task" --mode=early_exit_report
  "$PY" -m chainjax.main --config="$config" --workdir="$W/$task" --mode=export
  "$PY" experiments/serving/latency.py --workdir="$W/$task"
done
