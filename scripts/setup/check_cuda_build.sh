#!/usr/bin/env bash
# Build the CUDA flavour of pycaffe (FCNIFY_CUDA=1) in its own virtualenv and
# check it on a machine that may have no GPU:
#   1. set-up finishes: Caffe compiled and linked (cache key ...-cuda<N>-...),
#   2. ldd shows libcaffe/_caffe.so linked with libcudart and libcublas, nothing "not found",
#   3. `import caffe` works in the new virtualenv,
#   4. the CUDA build still runs in CPU mode (classify-map on the digits scene),
#   5. `fcnify classify-map --gpu 0` without a usable GPU fails with ONE line, exit 2
#      (with a GPU it must succeed instead).
# The CPU build in .venv is untouched: the virtualenv is separate (FCNIFY_VENV) and
# the cache key differs (flavour cuda13 instead of cpu). The first run takes
# ~7+ minutes on 2 cores; later runs reuse the cached build.
#
#   scripts/setup/check_cuda_build.sh            # virtualenv /tmp/fcnify-cuda-venv
#   FCNIFY_CUDA_CHECK_VENV=/tmp/v scripts/setup/check_cuda_build.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
SCENE="$REPO/prototxt/digits/scene.png"
VENV="${FCNIFY_CUDA_CHECK_VENV:-/tmp/fcnify-cuda-venv}"
LOG_DIR="${FCNIFY_CUDA_CHECK_LOGS:-/tmp/fcnify-cuda-check}"
mkdir -p "$LOG_DIR"
failures=0
ok() { echo "OK    $*"; }
bad() { echo "FAIL  $*"; failures=$((failures + 1)); }

echo "== set-up: FCNIFY_CUDA=1 FCNIFY_CAFFE=build FCNIFY_VENV=$VENV scripts/setup.sh"
start=$(date +%s)
if FCNIFY_CUDA=1 FCNIFY_CAFFE=build FCNIFY_VENV="$VENV" FCNIFY_EXTRAS="${FCNIFY_EXTRAS:-}" \
        scripts/setup.sh >"$LOG_DIR/setup.log" 2>&1; then
    ok "set-up finished in $(( $(date +%s) - start )) s (log: $LOG_DIR/setup.log)"
else
    bad "set-up failed after $(( $(date +%s) - start )) s; last lines of $LOG_DIR/setup.log:"
    tail -n 25 "$LOG_DIR/setup.log"
    exit 1
fi

PY="$VENV/bin/python"
MARKER="$VENV/fcnify-caffe.json"
key=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['key'])" "$MARKER")
pycaffe=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['pycaffe'])" "$MARKER")
tree=$(dirname "$pycaffe")
case "$key" in
    *-cuda[0-9]*) ok "cache key $key" ;;
    *) bad "cache key $key is not a CUDA flavour" ;;
esac
if [ -f "$tree/.fcnify-build-complete" ] && [ -f "$pycaffe/caffe/_caffe.so" ]; then
    ok "compiled and linked: $pycaffe/caffe/_caffe.so ($(cat "$tree/.fcnify-build-complete"))"
else
    bad "no complete build in $tree"
fi

echo "== ldd"
libcaffe=$(ls "$tree"/build/lib/libcaffe.so.* 2>/dev/null | head -n 1)
for so in "$pycaffe/caffe/_caffe.so" $libcaffe; do
    out=$(ldd "$so")
    echo "$out" | grep -E "cudart|cublas|curand" | sed "s|^|      $(basename "$so"): |"
    for lib in libcudart libcublas libcurand; do
        echo "$out" | grep -q "$lib.* => /" && ok "$(basename "$so") -> $lib" \
            || bad "$(basename "$so") is not linked with $lib (or it is not found)"
    done
    if echo "$out" | grep -q "not found"; then
        bad "$(basename "$so"): unresolved libraries: $(echo "$out" | grep 'not found' | tr -s ' \t' ' ')"
    fi
done

echo "== import caffe"
if out=$(cd / && GLOG_minloglevel=2 "$PY" -c "import caffe; print(caffe.__file__)" 2>&1); then
    ok "import caffe: $out"
else
    bad "import caffe fails: $(echo "$out" | tail -n 1)"
fi

echo "== CPU mode of the CUDA build"
if out=$(cd / && "$VENV/bin/fcnify" classify-map "$SCENE" --model digits --format json 2>&1 >/dev/null); then
    ok "classify-map --model digits (CPU mode) works"
else
    bad "classify-map in CPU mode fails: $(echo "$out" | tail -n 1)"
fi

echo "== fcnify --gpu 0"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
err="$LOG_DIR/gpu0.stderr"
(cd / && "$VENV/bin/fcnify" classify-map "$SCENE" --model digits --gpu 0 >"$LOG_DIR/gpu0.stdout" 2>"$err")
code=$?
lines=$(wc -l <"$err")
echo "      exit $code, stderr ($lines line(s)):"
sed 's/^/      | /' "$err"
if [ "${gpus:-0}" -gt 0 ]; then
    [ "$code" = 0 ] && ok "--gpu 0 runs on this machine's GPU" || bad "--gpu 0 fails although nvidia-smi lists $gpus GPU(s)"
else
    [ "$code" = 2 ] && ok "--gpu 0 without a GPU exits 2" || bad "--gpu 0 without a GPU exits $code, expected 2"
    [ "$lines" = 1 ] && ok "--gpu 0 without a GPU prints one line" || bad "--gpu 0 printed $lines lines, expected 1"
    grep -q "GPU 0" "$err" && ok "the line names GPU 0" || bad "the line does not name GPU 0"
fi

echo
if [ "$failures" = 0 ]; then echo "check_cuda_build: all checks passed"; else echo "check_cuda_build: $failures check(s) failed"; fi
[ "$failures" = 0 ]
