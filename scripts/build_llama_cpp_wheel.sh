#!/usr/bin/env bash
# Install llama-cpp-python into a virtual environment, building its wheel from source only once.
#
# llama-cpp-python has no CPU wheel on PyPI for every platform, and building it compiles all
# of llama.cpp (about 20 minutes on 2 cores). The built wheel is kept in a cache folder
# outside the repository, keyed by the package version, the Python tag and the CPU's
# instruction-set flags (the build targets the host CPU), so later runs on the same machine
# (a reused CI runner, a developer's laptop) install it in seconds. Concurrent runs wait for
# one build (flock). The tests that need llama.cpp (tests/test_export_gguf.py) skip with a
# message when it is not installed.
#
# usage: scripts/build_llama_cpp_wheel.sh [VENV]          (default VENV: .venv)
# env:   LLAMA_CPP_PYTHON_VERSION   (default 0.3.36, the version the exports are tested with)
#        POLYCODER_WHEEL_CACHE      (default ${XDG_CACHE_HOME:-~/.cache}/polycoder/wheels)
#        POLYCODER_SKIP_LLAMA_CPP=1 do nothing (CI without time for a first build)
#        POLYCODER_LLAMA_CPP_CACHED_ONLY=1  install from the cache if a wheel is there, never
#                                   build (what `make test` does, so a test run never spends
#                                   20+ minutes compiling; `make llama-cpp` builds it)
#        CMAKE_BUILD_PARALLEL_LEVEL (default: all cores)
set -euo pipefail
source "$(dirname "$0")/llama_cpp_cache.sh"

if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already installed in $VENV"
    exit 0
fi

pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
dir="$CACHE/llama-cpp-python-$VERSION-$pytag-$CPUKEY"
mkdir -p "$dir"

if [[ "${POLYCODER_LLAMA_CPP_CACHED_ONLY:-0}" == 1 ]] && ! ls "$dir"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "llama-cpp-python: no cached wheel in $dir; the llama.cpp comparison tests will skip (run \`make llama-cpp\` once to build it, 20-50 minutes)"
    exit 0
fi

exec 9>"$dir/.lock"
flock 9
if ! ls "$dir"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION into $dir (once; about 20 minutes on 2 cores) ..."
    start=$(date +%s)
    # Only the library: no tests, examples, server or curl.
    CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PY" -m pip wheel --no-deps "llama-cpp-python==$VERSION" -w "$dir.tmp" >"$dir/build.log" 2>&1 \
        || { echo "llama-cpp-python build failed; see $dir/build.log" >&2; tail -20 "$dir/build.log" >&2; rm -rf "$dir.tmp"; exit 1; }
    mv "$dir.tmp"/llama_cpp_python-*.whl "$dir"/
    rm -rf "$dir.tmp"
    echo "built in $(( $(date +%s) - start )) s"
fi
flock -u 9

# The wheel from the cache; its few pure-Python dependencies (diskcache, jinja2, ...) from the index.
constraints=(); [[ -f requirements/cpu-constraints.txt ]] && constraints=(-c requirements/cpu-constraints.txt)
"$PY" -m pip install -q "${constraints[@]}" --find-links "$dir" "llama-cpp-python==$VERSION"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed from', '$dir')"
