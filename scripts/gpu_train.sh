#!/bin/bash
# Train Cellpose-sized (nbase 2-32-64-128-256) nuclei and cyto networks in one go on a GPU
# machine, both side by side on the one GPU, for a fixed number of minutes.
#
#     OUT=DIR MINUTES=8 WORKERS=16 bash scripts/gpu_train.sh [REAL_DIR]
#
# Made for a short loan of a GPU machine (one command of at most 10 minutes, 16 cores): the
# synthetic sets are drawn there by WORKERS processes (no cache travels), each network starts
# from its bundled weights (cp3d_nuclei has Cellpose's widths already; the narrower cp3d_cyto
# is widened to them, cp3d.core.net.widen), and forked workers build the batches ahead so that
# the GPU is not kept waiting. MINUTES counts
# from the start, data included. REAL_DIR: a folder of the real volumes that the scripts build,
# each used if present: QCANet's 8-cell embryo (scripts/make_real_embryos.py; 3 times) and
# the training half of PlantSeg's nuclei (scripts/make_real_plant_cells.py, plant_nuclei_train;
# once) for nuclei, the pytorch-3dunet patch (plant_patch; twice, as the bundled cyto's last
# stage) for cyto; the 16-cell embryo, plant_nuclei_heldout and plant_ovule stay held out.
# The GPU machine gets only the checkout: put REAL_DIR in an ignored folder inside it
# (build/real, about 13 MB with all six) and carry it along.
# Writes OUT/gpu_nuclei.pth, OUT/gpu_cyto.pth (fp16, JSON sidecars) and their logs, then
# evaluates both there (bench/quality.py on the GPU, EVAL_MINUTES at most; EVAL=0 skips it)
# into OUT/eval_nuclei.log and OUT/eval_cyto.log. GPU=0 runs the same on the CPU (a smoke
# test); PYTHON: the interpreter (default python3, the GPU machine's).
# Within a 10-minute command: MINUTES=6 EVAL_MINUTES=2.5 (the rows of bench/quality.py are
# written as they come, so a cut evaluation still returns what it measured).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cp3d_gpu}
MINUTES=${MINUTES:-8}
WORKERS=${WORKERS:-16}
EPOCH_IMAGES=${EPOCH_IMAGES:-1024}
BATCH=${BATCH:-32}
BSIZE=${BSIZE:-224}
LR=${LR:-0.001}
SETS_SCALE=${SETS_SCALE:-1}  # a fraction for smoke tests: fewer volumes in every set
PYTHON=${PYTHON:-python3}
REAL_DIR=${1:-}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
gpu=--gpu
[ "${GPU:-1}" = 0 ] && gpu=
half=$((WORKERS / 2 > 1 ? WORKERS / 2 : 1))
n() { "$PYTHON" -c "print(max(1, round($1 * $SETS_SCALE)))"; }

common=(--nbase 2 32 64 128 256 --bsize "$BSIZE" --batch_size "$BATCH" --lr "$LR"
        --nimg_per_epoch "$EPOCH_IMAGES" --minutes "$MINUTES" --workers "$half" --threads 2
        --save_every 1)
nuclei=(--kind nuclei --init cp3d/resources/models/cp3d_nuclei.pth --out "$OUT/gpu_nuclei.pth"
        --work /tmp/cp3d_gpu_nuclei --cache /tmp/cp3d_gpu_cache
        --n_volumes "$(n 96)" --n_small "$(n 96)" --n_dim "$(n 48)" --n_sparse "$(n 96)"
        --n_uneven "$(n 64)")
cyto=(--kind cells --init cp3d/resources/models/cp3d_cyto.pth --out "$OUT/gpu_cyto.pth"
      --work /tmp/cp3d_gpu_cyto --cache /tmp/cp3d_gpu_cache
      --n_volumes "$(n 96)" --n_small "$(n 96)" --small_range 12 24)
# real_args NAME N: --real IMAGE MASKS, N times (the training planes' repeat), if REAL_DIR has it
real_args() {
    local img="$REAL_DIR/${1}_img.tif" gt="$REAL_DIR/${1}_gt.tif" i
    [ -n "$REAL_DIR" ] && [ -f "$img" ] && [ -f "$gt" ] || return 0
    for ((i = 0; i < $2; i++)); do printf '%s\n' --real "$img" "$gt"; done
}
mapfile -t got < <(real_args mouse_embryo_8cell 3; real_args plant_nuclei_train 1)
nuclei+=("${got[@]}")
mapfile -t got < <(real_args plant_patch 2)
cyto+=("${got[@]}")

(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv) \
    > "$OUT/gpu.txt" 2>&1
# a missing or mismatched package ends the run here, in seconds, not after the data is drawn
"$PYTHON" -c "import numba, numpy, scipy, tifffile, torch, cp3d.core.pipeline, cp3d.core.train
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__,
      'numba', numba.__version__)" >> "$OUT/gpu.txt" 2>&1 || { cat "$OUT/gpu.txt"; exit 1; }
# one numba thread per process: the volumes are drawn by WORKERS processes already
NUMBA_NUM_THREADS=1 "$PYTHON" scripts/train_bundled.py $gpu "${common[@]}" "${nuclei[@]}" \
    > "$OUT/gpu_nuclei.log" 2>&1 &
p1=$!
NUMBA_NUM_THREADS=1 "$PYTHON" scripts/train_bundled.py $gpu "${common[@]}" "${cyto[@]}" \
    > "$OUT/gpu_cyto.log" 2>&1 &
p2=$!
wait $p1; rc1=$?
wait $p2; rc2=$?
cat "$OUT/gpu.txt"
for kind in nuclei cyto; do
    echo "== $kind"; head -4 "$OUT/gpu_$kind.log"; tail -3 "$OUT/gpu_$kind.log"
done
[ $((rc1 || rc2)) = 0 ] || exit 1
[ "${EVAL:-1}" = 0 ] && exit 0
limit=$("$PYTHON" -c "print(int(${EVAL_MINUTES:-3} * 60))")
real=()
[ -n "$REAL_DIR" ] && real=(--real "$REAL_DIR")
export NUMBA_NUM_THREADS=$half  # the 3D dynamics of two evaluations side by side
timeout "$limit" "$PYTHON" bench/quality.py $gpu --kind nuclei --n_synth "${EVAL_SYNTH:-6}" \
    --model "$OUT/gpu_nuclei.pth" "${real[@]}" > "$OUT/eval_nuclei.log" 2>&1 &
timeout "$limit" "$PYTHON" bench/quality.py $gpu --kind cells --n_synth "${EVAL_SYNTH:-4}" \
    --model "$OUT/gpu_cyto.pth" "${real[@]}" > "$OUT/eval_cyto.log" 2>&1 &
wait
for kind in nuclei cyto; do echo "== eval $kind"; tail -n 22 "$OUT/eval_$kind.log"; done
