#!/usr/bin/env bash
# Put llama.cpp's own server, `llama-server`, into a virtual environment's bin/, building it
# from source only once.
#
# llama-server is what llama.vscode and llama.vim talk to (`/infill`), so the tests and
# benchmarks that compare our server with llama.cpp's own run it on our GGUF exports. It is
# built from the llama.cpp that llama-cpp-python's source release vendors (the same version
# as the Python bindings of scripts/build_llama_cpp_wheel.sh, so both compare one llama.cpp):
# only the `llama-server` target, statically linked, without its web UI, curl or OpenSSL
# (about 6 minutes on 2 cores). The binary is kept in a cache folder outside the repository,
# keyed by the version and the CPU's instruction-set flags (the build targets the host CPU);
# concurrent runs wait for one build (flock). Tests that need it skip with a message when it
# is not there.
#
# usage: scripts/build_llama_server.sh [VENV]          (default VENV: .venv)
# env:   LLAMA_CPP_PYTHON_VERSION   (default 0.3.36)
#        POLYCODER_WHEEL_CACHE      (default ${XDG_CACHE_HOME:-~/.cache}/polycoder/wheels)
#        POLYCODER_SKIP_LLAMA_CPP=1 do nothing
#        POLYCODER_LLAMA_CPP_CACHED_ONLY=1  install from the cache if a binary is there, never
#                                   build (what `make test` does; `make llama-cpp` builds it)
#        CMAKE_BUILD_PARALLEL_LEVEL (default: all cores)
set -euo pipefail
source "$(dirname "$0")/llama_cpp_cache.sh"

dir="$CACHE/llama-server-$VERSION-$CPUKEY"
mkdir -p "$dir"

if [[ "${POLYCODER_LLAMA_CPP_CACHED_ONLY:-0}" == 1 && ! -x "$dir/llama-server" ]]; then
    echo "llama-server: not built in $dir; the tests against it will skip (run \`make llama-cpp\` once to build it, about 6 minutes)"
    exit 0
fi

exec 9>"$dir/.lock"
flock 9
if [[ ! -x "$dir/llama-server" ]] && ! command -v cmake >/dev/null; then
    echo "llama-server: no cmake here to build it; tests against it will skip (install cmake)"
    exit 0
fi
if [[ ! -x "$dir/llama-server" ]]; then
    echo "building llama-server (llama.cpp of llama-cpp-python $VERSION) into $dir (once; about 6 minutes on 2 cores) ..."
    start=$(date +%s)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >"$dir/build.log" 2>&1 \
        || { echo "could not download the llama-cpp-python $VERSION source; see $dir/build.log" >&2; exit 1; }
    tar xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
    src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    { cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
          -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
          -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      && cmake --build "$work/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"; } >>"$dir/build.log" 2>&1 \
        || { echo "llama-server build failed; see $dir/build.log" >&2; tail -20 "$dir/build.log" >&2; exit 1; }
    # Into place in one rename: a killed build never leaves a half-written binary behind.
    cp "$work/build/bin/llama-server" "$dir/llama-server.tmp"
    mv "$dir/llama-server.tmp" "$dir/llama-server"
    echo "built in $(( $(date +%s) - start )) s"
fi
flock -u 9

ln -sf "$dir/llama-server" "$VENV/bin/llama-server"
echo "llama-server (llama.cpp of llama-cpp-python $VERSION) in $VENV/bin, from $dir"
