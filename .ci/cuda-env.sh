# Source this: a CUDA toolkit for building `--features cuda`, from PyPI's
# NVIDIA wheels in .venv (no GPU needed at build time):
#
#   .venv/bin/pip install -r .ci/cuda-requirements.txt
#   . .ci/cuda-env.sh && cargo build --release --features cuda --target-dir target/cuda
#
# The CUDA 12 wheels (nvidia-cuda-nvcc-cu12 up to 12.9.86) hold only ptxas,
# no nvcc and no cicc, so they cannot compile candle-kernels; the CUDA 13
# wheels (nvidia-cuda-nvcc, -crt, nvidia-nvvm, ...) are a whole toolkit
# under nvidia/cu13. Pinned to 13.4, the newest cudarc 0.19 knows.
_venv=${LARSLAB_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}
_cuda=$(echo "$_venv"/lib/python3*/site-packages/nvidia/cu13)
if [ ! -x "$_cuda/bin/nvcc" ]; then
    echo "cuda-env: error: no nvcc in $_cuda (pip install -r .ci/cuda-requirements.txt)" >&2
    return 1 2>/dev/null || exit 1
fi
# The layout a CUDA install has: lib64, and the unversioned names the linker asks for.
[ -e "$_cuda/lib64" ] || ln -s lib "$_cuda/lib64"
for _lib in cudart cublas cublasLt curand nvrtc; do
    _so=$(ls "$_cuda/lib/lib$_lib.so."* 2>/dev/null | head -n 1 || true)
    [ -n "$_so" ] && [ ! -e "$_cuda/lib/lib$_lib.so" ] && ln -s "$(basename "$_so")" "$_cuda/lib/lib$_lib.so"
done
# libcuda.so comes with the GPU driver, and no wheel holds the toolkit's stub
# of it (lib64/stubs/libcuda.so) that links without a driver. candle-core
# links cudarc dynamically (-lcuda), so without a driver the stub is made
# here: every driver function cudarc declares, as an empty function, soname
# libcuda.so.1, so that at run time the driver's own library is the one
# loaded. It is on the link path only (LIBRARY_PATH), never LD_LIBRARY_PATH.
if [ ! -e "$_cuda/lib/stubs/libcuda.so" ]; then
    # `|| true`: .ci/run sources this under `set -euo pipefail`, where a
    # failed `ls` (cudarc not yet unpacked in a fresh CARGO_HOME) would end CI.
    _sys=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1 || true)
    if [ -z "$_sys" ]; then
        cargo fetch --quiet
        _sys=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -n 1)
    fi
    mkdir -p "$_cuda/lib/stubs"
    grep -oP '^\s+fn \Kcu\w+(?=\()' "$_sys" | sort -u | sed 's/.*/void &(void) {}/' >"$_cuda/lib/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_cuda/lib/stubs/libcuda.so" "$_cuda/lib/stubs/libcuda.c"
fi
export CUDA_HOME=$_cuda CUDA_PATH=$_cuda CUDA_ROOT=$_cuda
export PATH=$_cuda/bin:$PATH
export LIBRARY_PATH=$_cuda/lib:$_cuda/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=$_cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13040}
unset _venv _cuda _lib _so _sys
