#!/usr/bin/env bash
# One round of the whole-slide speed checks on a CUDA machine, about 9 minutes on an H100/H200; each step is
# time-limited and writes its output under $OUT (default /tmp/gpu-round), so a cut round still tells what ran:
#
#   1. tests.txt: the GPU tests of the families the slide runs use (CUDA graphs, blending on the device);
#   2. slide.txt: bench_slide.py, SegFormer-B0 fp16 eager on a 32,768² px slide: model-only, end to end with one
#      tracing process and with two sharing out the classes, and with two and garbage collection left on during
#      the run (-collect), alternating (ratios within the one call);
#   3. host.txt: bench_host.py on the same slide: the host side alone (recorded outputs replayed, blank reads)
#      with one and two tracing processes and with collection on, then the class strips through the tracer alone.
#
#   4. with PROFILE=1 and py-spy on PATH (about 2 minutes more): gil-host.txt and gil-slide.txt, who holds the GIL
#      in replays and in GPU runs with two tracing processes (bench/gil_summary.py of py-spy --gil profiles;
#      the GPU one counts model-only's feeding threads too).
#
#   PY=.venv/bin/python SLIDE=/tmp/slide32k.tif OUT=/tmp/gpu-round [PROFILE=1] bash bench/gpu_round.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SLIDE=${SLIDE:-/tmp/slide32k.tif}
OUT=${OUT:-/tmp/gpu-round}
export PYTHONPATH="$PWD/python_server${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
    | tee "$OUT/device.txt"

writer=""
if [ ! -f "$SLIDE" ]; then  # written beside the tests (CPU), ready for the benches
    "$PY" bench/bench_slide.py --write-slide "$SLIDE" 32768 > "$OUT/slide-written.txt" 2>&1 &
    writer=$!
fi
timeout 200 "$PY" -m pytest -q -ra -m gpu tests/test_segformer.py tests/test_smp.py > "$OUT/tests.txt" 2>&1
echo "tests: exit $? ($(tail -1 "$OUT/tests.txt"))"
[ -n "$writer" ] && wait "$writer"

timeout 240 "$PY" bench/bench_slide.py --device cuda --size 32768 --slide "$SLIDE" --precision fp16 \
    --trace process1 process2 process2-collect process1 process2 process2-collect > "$OUT/slide.txt" 2>&1
echo "bench_slide: exit $?"
grep -E "model-only|tiles/s|ratio" "$OUT/slide.txt" | tail -12

timeout 100 "$PY" bench/bench_host.py --slide "$SLIDE" --outputs "$OUT/seg32k.npy" --readers 8 \
    --trace process1 process2 process2-collect process1 process2 process2-collect > "$OUT/host.txt" 2>&1
echo "bench_host replay: exit $?"
timeout 60 "$PY" bench/bench_host.py --slide "$SLIDE" --outputs "$OUT/seg32k.npy" \
    --tracing thread process1 process2 process1 process2 >> "$OUT/host.txt" 2>&1
echo "bench_host tracing: exit $?"
grep -E "^replay|^tracing" "$OUT/host.txt"

if [ "${PROFILE:-0}" = 1 ] && command -v py-spy > /dev/null; then
    timeout 60 py-spy record --gil --threads --nonblocking -r 250 --format raw -o "$OUT/gil-host.raw" -- \
        "$PY" bench/bench_host.py --slide "$SLIDE" --outputs "$OUT/seg32k.npy" --readers 8 \
        --trace process2 process2 process2 > /dev/null 2>&1
    "$PY" bench/gil_summary.py "$OUT/gil-host.raw" --rate 250 > "$OUT/gil-host.txt" 2>&1
    timeout 150 py-spy record --gil --threads --nonblocking -r 250 --format raw -o "$OUT/gil-slide.raw" -- \
        "$PY" bench/bench_slide.py --device cuda --size 32768 --slide "$SLIDE" --precision fp16 \
        --trace process2 process2 process2 > /dev/null 2>&1
    "$PY" bench/gil_summary.py "$OUT/gil-slide.raw" --rate 250 > "$OUT/gil-slide.txt" 2>&1
    echo "GIL profiles: $(head -1 "$OUT/gil-host.txt") (replays); $(head -1 "$OUT/gil-slide.txt") (GPU runs)"
fi
