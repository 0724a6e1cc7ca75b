#!/bin/bash
# The body of the sbatch templates (train.sbatch, train_multinode.sbatch); not submitted itself.
#
# Arguments: recipe and overlay YAMLs (each becomes --config), then --key=value overrides.
# The run directory is $ZOO_RUNS/$SLURM_JOB_NAME (ZOO_RUNS defaults to runs): the same for every
# restart of a job and for every job submitted under that name, so a requeued job finds its
# checkpoints and keeps logging into the same TensorBoard run (runs/<job name>/train). When
# train/checkpoints/last.ckpt exists there (a preemption save, a periodic save_last, or a ZeRO
# checkpoint folder of that name), the fit resumes from it.
# srun starts one task per GPU; python is exec'd by srun, so the SIGUSR1 that --signal sends to the
# job's steps reaches the zoo's Preemption callback, which saves, requeues the job and exits 0.
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "zoo: error: usage: sbatch recipes/cluster/train.sbatch RECIPE.yaml [OVERLAY.yaml ...] [--key=value ...]" >&2
    exit 2
fi
configs=()
overrides=()
for arg in "$@"; do
    case "$arg" in
        --*) overrides+=("$arg") ;;
        *)
            if [ ! -f "$arg" ]; then
                echo "zoo: error: no such config file: $arg (paths are relative to $PWD)" >&2
                exit 2
            fi
            configs+=(--config "$arg") ;;
    esac
done

run_dir="${ZOO_RUNS:-runs}/${SLURM_JOB_NAME}"
last="$run_dir/train/checkpoints/last.ckpt"
resume=()
if [ -e "$last" ]; then
    resume=(--ckpt_path="$last")
    echo "zoo: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): resuming from $last"
fi

# Run-directory flags after the configs (they win over a recipe's), the user's overrides after them.
exec srun --kill-on-bad-exit=1 "${ZOO_PYTHON:-python}" -m zoo fit "${configs[@]}" \
    --trainer.default_root_dir="$run_dir" \
    --trainer.logger.init_args.save_dir="$run_dir" \
    --trainer.num_nodes="$SLURM_JOB_NUM_NODES" \
    --trainer.devices="$SLURM_NTASKS_PER_NODE" \
    "${overrides[@]}" "${resume[@]}"
