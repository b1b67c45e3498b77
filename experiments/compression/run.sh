#!/usr/bin/env bash
# The compression results of experiments/compression/README.md: every run, its --mode=compress report, the table.
#
#   bash experiments/compression/run.sh [runs/compression] [fmnist|lstm ...]
#
# from the repository root, after `python -m chainjax.data.prepare fashion_mnist` (README, "Fashion-MNIST,
# offline"). Each run trains (resuming if its workdir has a checkpoint, returning at once if it finished),
# then `--mode=compress` writes its report with the per-stage sensitivity scan; table.py builds results.md.
set -euo pipefail
W=${1:-runs/compression}
shift || true
TASKS=${*:-fmnist lstm}
PY=${PYTHON:-python}

run() {  # run <workdir> <config> [overrides...]: train, then the report (kept if there is one)
  local workdir=$1 config=$2; shift 2
  "$PY" -m chainjax.main --config="$config" --workdir="$workdir" "$@"
  [ -f "$workdir/compress/report.json" ] ||
    "$PY" -m chainjax.main --config="$config" --workdir="$workdir" --mode=compress --config.compress.sensitivity=True "$@"
}

for task in $TASKS; do
  case $task in
    # 6 epochs = 2808 updates; gradual pruning reaches its target at update 1800 (about 2/3 of the run).
    fmnist) config=configs/fashion_mnist_cnn.py; base=(); prune_end=1800 ;;
    # 4 epochs = 5000 updates, no early stopping (every variant trains as long). The recipe's learning rate
    # falls 10x per epoch, so pruning ends with epoch 1 (update 1200), while the model still learns.
    lstm) config=configs/imdb_lstm.py:data=synthetic; base=(--config.num_epochs=4 --config.early_stopping.metric=)
          prune_end=1200 ;;
    *) echo "unknown task $task (fmnist, lstm)" >&2; exit 2 ;;
  esac
  run "$W/$task/float" "$config" "${base[@]}"
  run "$W/$task/qat_int8" "$config" "${base[@]}" --config.compress.qat.rules='("stages/.* w=8 a=8",)'
  run "$W/$task/qat_int4" "$config" "${base[@]}" --config.compress.qat.rules='("stages/.* w=4 a=8",)'
  if [ "$task" = lstm ]; then  # QAT fine-tuning of the float run: 1 epoch from its parameters (compress.init_from)
    for b in 8 4; do
      run "$W/$task/qat_int${b}_ft" "$config" --config.num_epochs=1 --config.early_stopping.metric= \
        --config.compress.init_from="$W/$task/float" --config.compress.qat.rules="(\"stages/.* w=$b a=8\",)"
    done
  fi
  # Gradual (Zhu & Gupta 2017): from 0 at update 0 to the target at prune_end, masks every 100 updates.
  for s in 80 90; do
    run "$W/$task/prune${s}" "$config" "${base[@]}" --config.compress.prune.sparsity=0.$s \
      --config.compress.prune.end_step=$prune_end
  done
  # One-shot: dense until prune_end, 90% of every kernel removed at once there, the same updates to recover.
  run "$W/$task/prune90_oneshot" "$config" "${base[@]}" --config.compress.prune.sparsity=0.9 \
    --config.compress.prune.begin_step=$prune_end --config.compress.prune.end_step=$prune_end
done
"$PY" experiments/compression/table.py "$W" > experiments/compression/results.md.tmp
mv experiments/compression/results.md.tmp experiments/compression/results.md
