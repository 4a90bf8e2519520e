#!/usr/bin/env bash
# On the CPU machine (has the package index): fill DEST (default .peer, git-ignored) with the peer software
# that side_by_side.sh takes to the GPU machine, which has no network:
#   DEST/llama.cpp-src.tar.xz  llama.cpp's source as vendored in the PyPI sdist of llama-cpp-python, trimmed
#                              to what a CUDA build of llama-bench and llama-batched-bench configures and compiles
#   DEST/pylib/bitsandbytes    the bitsandbytes wheel unpacked (CPU + CUDA 13 libraries only; the GPU machine
#                              has python 3.12 and CUDA 13)
#   DEST/VERSIONS              what was fetched
# Everything comes from registry packages at preparation time; none of it is committed. About 13 MB, well
# under the 64 MiB a device call carries (working tree ~1.5 MB + .wheels ~6 MB + this).
# usage: bash benchmarks/peers/prepare.sh [DEST]
set -euo pipefail
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
BITSANDBYTES=${BITSANDBYTES:-0.50.2}
dest=${1:-.peer}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest"; mkdir -p "$dest/pylib"

python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON"
tar xzf "$tmp"/llama_cpp_python-"$LLAMA_CPP_PYTHON".tar.gz -C "$tmp"
src=$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
[ -f "$src/CMakeLists.txt" ] || { echo "no vendored llama.cpp in the sdist ($src)" >&2; exit 1; }
# Trim by rule (176 MB -> ~10 MB compressed). Kept: CMake files, ggml core + CPU + CUDA backends, src, common,
# vendor, gguf-py (make_gguf.py writes the GGUFs with it), tools (tools/CMakeLists.txt adds each subfolder
# unconditionally, so the folders stay; only bulky assets go), the one vocabulary GGUF make_gguf.py copies.
(
  cd "$src"
  rm -rf .github docs media benches tests examples pocs app ci skills conversion scripts grammars \
         requirements tools/ui tools/mtmd/test-*.mp4 gguf-py/tests
  for b in ggml/src/ggml-*/; do  # other backends (licenses/ and the small ggml-rpc stay)
    case $(basename "$b") in ggml-cpu|ggml-cuda|ggml-blas|ggml-rpc) ;; *) rm -rf "$b" ;; esac
  done
  find models -mindepth 1 -maxdepth 1 ! -name ggml-vocab-llama-spm.gguf ! -name CMakeLists.txt -exec rm -rf {} +
)
# CMakeLists.txt refers to tests/, examples/, pocs/ and app/ only behind options that side_by_side.sh turns
# off; the CPU-machine check in README.md (cmake configure of the trimmed tree) catches a change there.
mkdir -p "$tmp/llama.cpp"
cp -a "$src/." "$tmp/llama.cpp/"
tar cJf "$dest/llama.cpp-src.tar.xz" -C "$tmp" llama.cpp

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d "$tmp/whl" "bitsandbytes==$BITSANDBYTES"
python3 -m zipfile -e "$tmp"/whl/bitsandbytes-*.whl "$dest/pylib"
find "$dest/pylib/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
printf 'llama-cpp-python==%s (vendored llama.cpp, trimmed)\nbitsandbytes==%s\n' "$LLAMA_CPP_PYTHON" "$BITSANDBYTES" > "$dest/VERSIONS"
du -sh "$dest"
