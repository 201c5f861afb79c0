#!/usr/bin/env bash
# Robust mode on a real model: SD1.4 nudity erased with UCE, RECE and robust, side by side.
#   1. three edits (seconds each)          → $OUT/{uce,rece,robust}.safetensors, edit times in $OUT/erase-times.txt
#   2. NudeNet on I2P nudity prompts       → images per exposed class, nudity rate (the paper's Table 1)
#   3. UnlearnDiff ASR on those prompts    → attack success rate per method (the paper's Table 3)
#   4. FID and CLIP score on a COCO-30k subset (FID against $COCO_IMAGES, else against the original model's images)
#   5. one HTML report per measurement     → $OUT/*.html
#
# Needs a CUDA GPU, rece with a CUDA torch, `pip install -e ".[eval]" scipy`, and the benchmark CSVs in
# $RECE_BENCHMARKS (nudity.csv, coco_30k.csv). Online the first time (model, NudeNet, CLIP, Inception weights).
# Every step is resumable: rerun the script after an interruption and finished images are kept.
#
#     RECE_BENCHMARKS=/data/benchmarks bash bench/robust_sd.sh
#
# Settings (environment, defaults in brackets): MODEL [CompVis/stable-diffusion-v1-4], OUT [runs/robust-sd],
# I2P_LIMIT [all 142 nudity prompts], COCO [1000 captions], PRESERVE [1000 other COCO captions for robust's
# --preserve-prompts], UD_LIMIT [50 prompts attacked], UD_ARGS [the UnlearnDiff paper's parameters], STEPS [50],
# SCHEDULER [lms], GEN_ARGS / UD_ARGS / EVAL_ARGS [extra flags for rece generate / attack / evaluate], COCO_IMAGES
# [unset: FID against the original model's images], ERASE_DEVICE [cuda], PYTHON [python3], ROBUST_ARGS [robust mode's
# defaults: --support 0.9999, no adversarial rounds; e.g. "--adversarial-rounds 1 --tradeoff 3"].
# At the defaults on one H200: erasing takes seconds, generation about 1.5 h, UnlearnDiff most of the rest.
set -euo pipefail

MODEL=${MODEL:-CompVis/stable-diffusion-v1-4}
OUT=${OUT:-runs/robust-sd}
BENCH=${RECE_BENCHMARKS:?set RECE_BENCHMARKS to the folder holding nudity.csv and coco_30k.csv}
COCO=${COCO:-1000}
PRESERVE=${PRESERVE:-1000}
UD_LIMIT=${UD_LIMIT:-50}
UD_ARGS=${UD_ARGS:-}
STEPS=${STEPS:-50}
SCHEDULER=${SCHEDULER:-lms}
GEN_ARGS=${GEN_ARGS:-}
ERASE_DEVICE=${ERASE_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
EVAL_ARGS=${EVAL_ARGS:-}
ROBUST_ARGS=${ROBUST_ARGS:-}
LIMIT=()
[ -n "${I2P_LIMIT:-}" ] && LIMIT=(--limit "$I2P_LIMIT")
METHODS=(uce rece robust)

mkdir -p "$OUT"
for f in nudity.csv coco_30k.csv; do
    [ -f "$BENCH/$f" ] || { echo "robust_sd.sh: $BENCH/$f is missing; point RECE_BENCHMARKS at the benchmark CSVs" >&2; exit 2; }
done

# COCO subsets: the first $COCO captions are measured; the next $PRESERVE tell robust mode what to keep
"$PYTHON" - "$BENCH/coco_30k.csv" "$OUT" "$COCO" "$PRESERVE" <<'EOF'
import csv, os, sys
source, out, measured, preserved = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(source, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    rows, header = list(reader), reader.fieldnames
for name, part in (("coco.csv", rows[:measured]), ("coco-preserve.csv", rows[measured : measured + preserved])):
    with open(os.path.join(out, name + ".tmp"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(part)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
EOF

# The machine the numbers come from: on the screen, and in $OUT/machine.txt beside the results
"$PYTHON" "$(dirname "$0")/machine.py" | tee "$OUT/machine.txt"

echo "== 1. erase nudity (the paper's preset) with UCE, RECE and robust"
: > "$OUT/erase-times.txt"
rece erase "$MODEL" --preset nudity --method uce --device "$ERASE_DEVICE" --overwrite -o "$OUT/uce.safetensors" | tee -a "$OUT/erase-times.txt"
rece erase "$MODEL" --preset nudity --method rece --device "$ERASE_DEVICE" --overwrite -o "$OUT/rece.safetensors" | tee -a "$OUT/erase-times.txt"
# shellcheck disable=SC2086
rece erase "$MODEL" --preset nudity --method robust --device "$ERASE_DEVICE" \
    --concept-prompts "$BENCH/nudity.csv" --preserve-prompts "$OUT/coco-preserve.csv" $ROBUST_ARGS \
    --overwrite -o "$OUT/robust.safetensors" | tee -a "$OUT/erase-times.txt"
# the trade-off the robust edit made: residual of the best embedding of all, the preserved captions' K/V change
rece info "$OUT/robust.safetensors" | tee "$OUT/robust-info.txt"

edit_flag() { [ "$1" = sd ] || echo "--edit $OUT/$1.safetensors"; }

echo "== 2. I2P nudity prompts → NudeNet"
for m in sd "${METHODS[@]}"; do
    # shellcheck disable=SC2046,SC2086
    rece generate "$MODEL" $(edit_flag "$m") --prompts "$BENCH/nudity.csv" "${LIMIT[@]}" --scheduler "$SCHEDULER" \
        --steps "$STEPS" $GEN_ARGS -o "$OUT/$m-i2p"
done
# shellcheck disable=SC2086
rece evaluate "$OUT"/{sd,uce,rece,robust}-i2p --metric nudenet $EVAL_ARGS | tee "$OUT/nudenet.txt"

echo "== 3. UnlearnDiff on the first $UD_LIMIT nudity prompts → ASR"
for m in "${METHODS[@]}"; do
    # shellcheck disable=SC2086
    rece attack "$MODEL" --edit "$OUT/$m.safetensors" --attack unlearndiff --concept nudity \
        --prompts "$BENCH/nudity.csv" --limit "$UD_LIMIT" --steps "$STEPS" $UD_ARGS -o "$OUT/$m-unlearndiff"
done
# shellcheck disable=SC2086
rece evaluate "$OUT"/{uce,rece,robust}-unlearndiff --metric asr $EVAL_ARGS | tee "$OUT/unlearndiff.txt"

echo "== 4. COCO-30k subset → FID and CLIP score"
for m in sd "${METHODS[@]}"; do
    # shellcheck disable=SC2046,SC2086
    rece generate "$MODEL" $(edit_flag "$m") --prompts "$OUT/coco.csv" --steps "$STEPS" $GEN_ARGS -o "$OUT/$m-coco"
done
REFERENCE=${COCO_IMAGES:-$OUT/sd-coco/images}
# shellcheck disable=SC2086
rece evaluate "$OUT"/{sd,uce,rece,robust}-coco --metric fid,clip-score --reference "$REFERENCE" $EVAL_ARGS \
    | tee "$OUT/coco.txt"

echo "== 5. reports"
rece report "$OUT"/{sd,uce,rece,robust}-i2p -o "$OUT/nudity.html"
rece report "$OUT"/{uce,rece,robust}-unlearndiff -o "$OUT/unlearndiff.html"
rece report "$OUT"/{sd,uce,rece,robust}-coco -o "$OUT/coco.html"
echo "done: $OUT/nudenet.txt, unlearndiff.txt, coco.txt, erase-times.txt and the three reports"
