# Shared by tools/check_cuda_build.sh and tools/gpu_check.sh (sourced): where the CUDA toolkit is, and the
# CUDA headers that ship inside the torch wheels.

# The toolkit to build against: CUDA_HOME when set, else the one nvcc belongs to that has libcudart (torch
# takes CUDA_HOME from nvcc's folder, and a wrapper such as /usr/local/bin/nvcc makes that /usr/local, where
# libcudart is missing and the link fails). Prints it; returns 1 when there is none.
find_cuda_home() {
  [ -n "${CUDA_HOME:-}" ] && { echo "$CUDA_HOME"; return 0; }
  command -v nvcc >/dev/null || return 1
  local candidate lib
  for candidate in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    for lib in lib64 lib targets/x86_64-linux/lib; do
      [ -e "$candidate/$lib/libcudart.so" ] && { echo "$candidate"; return 0; }
    done
  done
  return 1
}

# CPATH with the include folders of the nvidia/* wheels under site-packages folder $1 put first (cuBLAS and
# friends' headers, which a bare toolkit may lack).
cpath_with_torch_cuda_headers() {
  local path=${CPATH:-} include
  for include in "$1"/nvidia/*/include; do
    [ -d "$include" ] && path="$include${path:+:$path}"
  done
  echo "$path"
}
