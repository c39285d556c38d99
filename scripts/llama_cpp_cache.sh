# Sourced by scripts/build_llama_cpp_wheel.sh and scripts/build_llama_server.sh: what both
# builds of llama.cpp share. Sets VENV (the first argument, default .venv), VERSION
# (LLAMA_CPP_PYTHON_VERSION, default 0.3.36, the version the exports are tested with), CACHE
# (POLYCODER_WHEEL_CACHE, default ${XDG_CACHE_HOME:-~/.cache}/polycoder/wheels), PY and
# CPUKEY (the builds target the host CPU: they are kept per CPU's instruction-set flags);
# exits 0 at once with POLYCODER_SKIP_LLAMA_CPP=1, and 2 without the environment's Python.
VENV=${1:-.venv}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${POLYCODER_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/polycoder/wheels}
PY="$VENV/bin/python"

if [[ "${POLYCODER_SKIP_LLAMA_CPP:-0}" == 1 ]]; then
    echo "$(basename "$0"): skipped (POLYCODER_SKIP_LLAMA_CPP=1); the llama.cpp tests will skip"
    exit 0
fi
[[ -x "$PY" ]] || { echo "no Python at $PY; run make setup first" >&2; exit 2; }
CPUKEY=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
