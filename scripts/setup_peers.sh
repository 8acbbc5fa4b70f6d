#!/usr/bin/env bash
# Install the optional peers into .venv (called by `make peers`; idempotent): llama-cpp-python built from its source
# package (llama.cpp, CPU only: no CUDA / BLAS, no server, examples, tools or llava), then scripts/requirements-peers.txt.
# -march=native without AMX: on a Xeon whose VM exposes AMX, llama.cpp 0.3.36's AMX buffer type (auto-selected for
# Q4_0 / Q8_0 weights) segfaults in the first matmul here; without it Q4_0 / Q8_0 run ggml's AVX-512 repacked kernels.
# `make test` never needs them: the tests that do are marked `peers` and skip without them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PIP=(env PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q -c scripts/constraints.txt)
LLAMA_CPP_PYTHON=0.3.36
if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('llama_cpp_python') == '$LLAMA_CPP_PYTHON'" 2>/dev/null; then
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON (llama.cpp from source, CPU only; ~13 min on a loaded 2-core VM)..."
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF" \
  CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "${PIP[@]}" --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi
"${PIP[@]}" --no-deps -r scripts/requirements-peers.txt
