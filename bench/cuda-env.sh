# Source this file (bash) to build fedtune with `--features cuda` on a machine without a system CUDA:
#   cargo fetch && source bench/cuda-env.sh && cargo build --release --features cuda -p site-agent
# (The recipe of ../shared/gpu/cuda-env.sh, plus cuDNN 9 for fedtune's convolution ops.)
# First use installs NVIDIA's CUDA 13.0 compiler and libraries from PyPI (about 1.2 GB) into
# $FEDTUNE_CUDA_DIR (default ~/.cache/fedtune-cuda) and makes a link-time-only libcuda stub.
# Why 13.0 and not newer: the lent H100/H200 machines run driver 580 (CUDA 13.0), whose JIT accepts
# PTX ISA <= 9.0; a newer nvcc emits PTX that driver refuses. Never ship the stub: at run time the
# real libcuda.so.1 comes from the driver.
_fc_dir=${FEDTUNE_CUDA_DIR:-$HOME/.cache/fedtune-cuda}
if [ ! -x "$_fc_dir/venv/bin/python" ]; then
  python3 -m venv "$_fc_dir/venv" &&
  "$_fc_dir/venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96" \
    "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas>=13.0,<13.1" "nvidia-curand==10.4.0.35" "nvidia-cudnn-cu13>=9.13,<9.14" ||
    { echo "cuda-env: pip install failed" >&2; return 1; }
fi
_fc_pip=$(ls -d "$_fc_dir"/venv/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
# cuDNN came later to the recipe: a venv made before it gets it now.
if ! ls -d "$_fc_dir"/venv/lib/python3*/site-packages/nvidia/cudnn >/dev/null 2>&1; then
  "$_fc_dir/venv/bin/pip" install -q "nvidia-cudnn-cu13>=9.13,<9.14" ||
    { echo "cuda-env: pip install of cuDNN failed" >&2; return 1; }
fi
_fc_cudnn=$(ls -d "$_fc_dir"/venv/lib/python3*/site-packages/nvidia/cudnn | head -n 1)
if [ ! -e "$_fc_dir/stub/lib/libcudnn.so" ]; then
  mkdir -p "$_fc_dir/stub/lib"
  ln -sf "$_fc_cudnn/lib/libcudnn.so.9" "$_fc_dir/stub/lib/libcudnn.so"
fi
if [ ! -e "$_fc_dir/stub/lib/libcuda.so" ]; then
  _fc_sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -n 1)
  [ -n "$_fc_sys" ] || { echo "cuda-env: run 'cargo fetch' first (cudarc source is needed for the libcuda stub)" >&2; return 1; }
  mkdir -p "$_fc_dir/stub/lib"
  grep -oE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$_fc_sys" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
    awk '{print "int " $1 "(void){return 100;}"}' > "$_fc_dir/stub/s.c"
  gcc -shared -fPIC -o "$_fc_dir/stub/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$_fc_dir/stub/s.c" || return 1
  for _l in cublas cublasLt nvrtc cudart; do ln -sf "$_fc_pip/lib/lib$_l.so.13" "$_fc_dir/stub/lib/lib$_l.so"; done
  ln -sf "$_fc_pip/lib/libcurand.so.10" "$_fc_dir/stub/lib/libcurand.so"
fi
export CUDA_HOME=$_fc_pip CUDA_PATH=$_fc_pip CUDA_ROOT=$_fc_pip
export CUDA_TOOLKIT_ROOT_DIR=$_fc_dir/stub
export PATH=$_fc_pip/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
echo "cuda-env: nvcc $(nvcc --version | grep -oE 'release [0-9.]+'), compute cap $CUDA_COMPUTE_CAP, stub $CUDA_TOOLKIT_ROOT_DIR/lib"
