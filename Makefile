# Set-up and the two commands of the README. Every target installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-as-avx2 llama-cpp clean

$(STAMP): pyproject.toml requirements/cpu-constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first and as a constraint, so nothing pulls a CUDA build.
	$(BIN)/pip install -q -c requirements/cpu-constraints.txt -e '.[all,test]'
	touch $(STAMP)

setup: $(STAMP)

# At the cursor, as an editor asks: the code before it (stdin) and after it (--suffix).
demo: $(STAMP)
	printf 'public class Main {\n    public static void main(String[] args) {\n        ' | \
		$(BIN)/polycoder generate --suffix "$$(printf '\n    }\n}\n')" --max-new-tokens 48 --temperature 0 --echo

test: $(STAMP)
	$(BIN)/ruff check .
	# llama.cpp (for the GGUF comparison tests) from the wheel cache only: never a 20-minute build here.
	POLYCODER_LLAMA_CPP_CACHED_ONLY=1 scripts/build_llama_cpp_wheel.sh $(VENV)
	POLYCODER_LLAMA_CPP_CACHED_ONLY=1 scripts/build_llama_server.sh $(VENV)
	$(BIN)/python -m pytest -q

# Build llama-cpp-python (20-50 minutes on 2 cores) and llama.cpp's llama-server (about 6) once
# into ~/.cache/polycoder/wheels.
llama-cpp: $(STAMP)
	scripts/build_llama_cpp_wheel.sh $(VENV)
	scripts/build_llama_server.sh $(VENV)

test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m 'not slow'

# The suite as a CPU without AVX-512 runs it, on one with AVX-512: torch's, oneDNN's and MKL's
# AVX2 code and our kernels' AVX2 variant (llama.cpp's cached build stays what it is). Numbers
# that only hold for one CPU's code fail here; .ci/run calls it where the CPU has AVX-512.
test-as-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 POLYCODER_KERNELS_ISA=avx2 \
		$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
