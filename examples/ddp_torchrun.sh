#!/usr/bin/env bash
# Multi-process fine-tuning with torchrun: the Hugging Face Trainer wraps the model in DDP (one process per
# GPU, or per CPU slot with gloo when there is no GPU). The shared global and mid branches live once in
# model.msplora_bank, so DDP all-reduces each shared tensor once.
#
# Usage: examples/ddp_torchrun.sh NPROC [arguments of examples/finetune_trainer.py]
#   examples/ddp_torchrun.sh 8 --model meta-llama/Llama-2-7b-hf --dataset yahma/alpaca-cleaned \
#       --ranks 64 32 16 --bf16 --batch-size 4 --grad-accum 4 --epochs 3 --lr 3e-4 --output runs/alpaca
#   examples/ddp_torchrun.sh 2 --smoke --staged --max-steps 6 --output /tmp/ddp-smoke    # offline, CPU
#
# Staged training (--staged) freezes scales after DDP has wrapped the model, which needs
# find_unused_parameters=True; it is passed here explicitly (it is also the Trainer's default unless gradient
# checkpointing is on).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NPROC [finetune_trainer.py arguments]" >&2
    exit 2
fi
NPROC="$1"
shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" \
    "$HERE/finetune_trainer.py" --ddp-find-unused-parameters true "$@"
