#!/usr/bin/env bash
# Launches train_gpt.py on this node with one process per visible GPU; arguments pass through
# (./run.sh --num_iterations=200). NPROC=4 ./run.sh overrides the process count.
# One quick process first checks the settings, memory, data and log folder (--check_only=true), so a
# mistake shows as the trainer's one-line error and exit status 2, not inside torchrun's traceback.
set -euo pipefail
cd "$(dirname "$0")"
train_files_given=false
for arg in "$@"; do
    # --help needs no GPU: it prints the trainer's settings on any machine
    if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then exec python train_gpt.py --help; fi
    case "$arg" in --train_files=*) train_files_given=true ;; esac
done
if [ -z "${NPROC:-}" ]; then
    NPROC=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$NPROC" -eq 0 ]; then
        echo "run.sh: no CUDA GPU is visible. On CPU, run the small preset in one process instead:" >&2
        echo "  python data/cached_fineweb10B.py 1   # once: the validation shard + 1 training shard (400 MB)" >&2
        echo "  python train_gpt.py --preset=tiny" >&2
        echo "(or on your own text: see README 'First contact'; NPROC=2 ./run.sh --preset=tiny for two gloo ranks)" >&2
        exit 1
    fi
fi
# In the Docker image (SPEEDRUN_IMAGE, set by the Dockerfile) the data folder is a mount: say how to fill it.
if [ -n "${SPEEDRUN_IMAGE:-}" ] && [ "$train_files_given" = false ] && ! compgen -G "data/fineweb10B/fineweb_train_*.bin" >/dev/null; then
    echo "run.sh: no training data in the image's data/fineweb10B; download it into the mounted folder with:" \
        "docker run --rm -v \"\$PWD/data/fineweb10B\":/speedrun/data/fineweb10B speedrun python data/cached_fineweb10B.py 5" >&2
    exit 2
fi
WORLD_SIZE="$NPROC" LOCAL_WORLD_SIZE="$NPROC" python train_gpt.py "$@" --check_only=true
# torchrun in harness.py's launcher: a stop signal (Ctrl-C, a scheduler's SIGTERM) ends with the ranks' one
# line and their exit status (75 after a clean stop), not torchrun's traceback and exit status 1
exec python harness.py launch "$NPROC" train_gpt.py "$@"
