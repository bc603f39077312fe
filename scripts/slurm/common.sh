# Shared body of the stage templates in this folder; they set STAGE and CONFIG and source it.
# Submit from the repository root (e.g. `sbatch scripts/slurm/align.sbatch`). Environment knobs:
#   CONFIG       the stage's YAML (default: the template's configs/imagenet/<stage>.yaml)
#   ROOT         trainer.default_root_dir, where the requeue checkpoint hpc_ckpt_N.ckpt is written
#                and found again (default runs/slurm/<stage>); keep it fixed across requeues
#   SCALE_LR=1   scale lr (and fake_lr, disc_lr when set) by global batch / REF_BATCH (linear rule)
#   REF_BATCH    the global batch the config's learning rates are meant for (default 256)
#   BATCH        per-device batch (default: data.init_args.batch_size of CONFIG)
#   STRATEGY     trainer.strategy override (default: the config's); STRATEGY=fsdp2 shards the DiT
#                (diffusion stage only; see dmvae_lightning/strategies.py)
#   PYTHON       the interpreter (default python); any further arguments of the template are
#                passed to `dmvae fit` (e.g. --trainer.max_steps 1000).
set -euo pipefail
: "${STAGE:?set STAGE}" "${CONFIG:?set CONFIG}"
PYTHON=${PYTHON:-python}
ROOT=${ROOT:-runs/slurm/$STAGE}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
TASKS=${SLURM_NTASKS_PER_NODE:-1}
TASKS=${TASKS%%(*}  # SLURM may write "8(x2)"

config_value() {  # config_value model lr -> model.init_args.lr of CONFIG (empty when unset)
    "$PYTHON" - "$CONFIG" "$1" "$2" <<'PY'
import sys

import yaml

section = (yaml.safe_load(open(sys.argv[1])) or {}).get(sys.argv[2]) or {}
value = (section.get("init_args") or section).get(sys.argv[3])
print("" if value is None else value)
PY
}

BATCH=${BATCH:-$(config_value data batch_size)}
GLOBAL_BATCH=$((NODES * TASKS * BATCH))
ARGS=(--config "$CONFIG" --trainer.num_nodes "$NODES" --trainer.devices "$TASKS"
      --trainer.default_root_dir "$ROOT")
if [ -n "${STRATEGY:-}" ]; then
    ARGS+=(--trainer.strategy "$STRATEGY")
fi
if [ "${SCALE_LR:-0}" = 1 ]; then
    for name in lr fake_lr disc_lr; do
        base=$(config_value model "$name")
        if [ -n "$base" ]; then
            scaled=$("$PYTHON" -c "print($base * $GLOBAL_BATCH / ${REF_BATCH:-256})")
            ARGS+=("--model.init_args.$name" "$scaled")
        fi
    done
fi
echo "dmvae $STAGE: $NODES nodes x $TASKS tasks, global batch $GLOBAL_BATCH, root $ROOT"
# No --ckpt_path: after a requeue Lightning resumes from the newest ROOT/hpc_ckpt_N.ckpt.
srun "$PYTHON" -m dmvae_lightning.cli fit "${ARGS[@]}" "$@"
