#!/usr/bin/env bash
# Builds a CUDA toolchain stand-in into DIR for building and testing the `cuda` feature on a
# machine without a GPU or a CUDA toolkit (scripts/cuda-emu.sh uses it):
#   DIR/bin/nvcc   a stand-in compiler (nvcc here): PTX that names its source, empty objects
#   DIR/lib/libcuda.so   the emulated driver (libcuda.cpp) running dpo_ops.cu's kernels on the
#                  CPU, plus a stub for every other function of the CUDA libraries cudarc binds
#                  (each says its name and fails; with CUDA_EMU_DRY set, succeeds and does
#                  nothing); libcublas.so, libcublasLt.so, libcurand.so,
#                  libnvrtc.so and libcudart.so are links to it (one SONAME, so one library).
# Needs a C++20 compiler ($CXX, else c++) and the cudarc sources (cargo fetch).
set -euo pipefail
DIR="$(mkdir -p "${1:?usage: build.sh DIR}" && cd "$1" && pwd)"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../../../.." && pwd)"
CXX="${CXX:-c++}"
mkdir -p "$DIR/bin" "$DIR/lib" "$DIR/src"
install -m 755 "$HERE/nvcc" "$DIR/bin/nvcc"

version="$(grep -A1 '^name = "cudarc"' "$ROOT/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')"
cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version" 2>/dev/null | head -1 || true)"
if [ -z "$cudarc" ]; then
    (cd "$ROOT" && cargo fetch --quiet)
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version" | head -1)"
fi

# Weak stubs for every function cudarc binds in the libraries candle links.
{
    echo '#include <stdio.h>'
    echo '#include <stdlib.h>'
    echo 'static int stub(const char *name) {'
    echo '    const char *dry = getenv("CUDA_EMU_DRY");'
    echo '    if (dry && *dry) return 0; /* a dry run: succeed, do nothing */'
    echo '    fprintf(stderr, "cuda-emu: %s is not emulated\n", name);'
    echo '    return 999;'
    echo '}'
    for lib in driver cublas cublaslt curand nvrtc runtime; do
        sed -n 's/^ *fn \([A-Za-z0-9_]*\)(.*;$/\1/p' "$cudarc/src/$lib/sys/mod.rs"
    done | sort -u | while read -r f; do
        echo "__attribute__((weak)) int $f(void) { return stub(\"$f\"); }"
    done
} > "$DIR/src/stubs.c"

# The kernels' names, from the compiled kernels (extern "C": unmangled).
cat > "$DIR/src/names.cpp" <<CPP
#include "emu.h"
#include "$ROOT/crates/dpo-model/kernels/dpo_ops.cu"
CPP
"$CXX" -std=c++20 -c -I "$HERE/../include" -I "$HERE/.." "$DIR/src/names.cpp" -o "$DIR/src/names.o"
nm --defined-only "$DIR/src/names.o" | awk '$2 == "T" && $3 ~ /^dpo_/ { print "K(" $3 ")" }' > "$DIR/src/registry.inc"
[ -s "$DIR/src/registry.inc" ] || { echo "build.sh: no kernels found in dpo_ops.cu" >&2; exit 1; }

# The kernels compiled as nvcc does by default (--fmad=true): a * b + c contracted into an FMA
# (GCC forms them from -O2), so that a kernel relying on a product being rounded on its own
# fails here as on a GPU.
contract="-O2 -ffp-contract=fast"
if [ "$(uname -m)" = x86_64 ] && grep -qw fma /proc/cpuinfo 2>/dev/null; then contract="$contract -mfma"; fi
# A 16-byte vector load or store at an address that is not a multiple of 16 faults on the GPU
# and works on the CPU: with the vector types aligned as CUDA's (emu.h), it stops the run here.
align="-fsanitize=alignment -fno-sanitize-recover=alignment"
"${CC:-cc}" -c -fPIC -O1 "$DIR/src/stubs.c" -o "$DIR/src/stubs.o"
"$CXX" -std=c++20 $contract $align -fPIC -pthread ${CUDA_EMU_CXXFLAGS:-} -I "$HERE/../include" -I "$HERE/.." -I "$DIR/src" \
    -c "$HERE/libcuda.cpp" -o "$DIR/src/libcuda.o"
"$CXX" -shared -pthread $align ${CUDA_EMU_CXXFLAGS:-} -Wl,-soname,libcuda.so -o "$DIR/lib/libcuda.so" \
    "$DIR/src/libcuda.o" "$DIR/src/stubs.o"
for lib in cublas cublasLt curand nvrtc cudart; do ln -sf libcuda.so "$DIR/lib/lib$lib.so"; done
echo "cuda-emu toolchain in $DIR ($(wc -l < "$DIR/src/registry.inc") kernels)"
