#!/usr/bin/env bash
# Launches train_gpt.py on this node with one process per visible GPU; arguments pass through
# (./run.sh --num_iterations=200). NPROC=4 ./run.sh overrides the process count.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${NPROC:-}" ]; then
    NPROC=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$NPROC" -eq 0 ]; then
        echo "run.sh: no CUDA GPU is visible. On CPU, run the small preset in one process instead:" >&2
        echo "  python train_gpt.py --preset=tiny --train_files='data/fineweb10B/fineweb_train_000001.bin'" >&2
        echo "(or NPROC=2 ./run.sh --preset=tiny ... for two gloo ranks)" >&2
        exit 1
    fi
fi
exec torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py "$@"
