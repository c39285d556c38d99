#!/usr/bin/env bash
# The checks that need a GPU, in one short run, for a session that is lent one (the device
# tool: 15 minutes of device time in all, so they run first and fast, and the time left goes
# to training the bundled model, phase 5 of scripts/train_bundled.sh, on carried shards).
#
#   scripts/gpu_checks.sh OUT [TOKENS_DIR]     # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 scripts/gpu_checks.sh /tmp/gpu-smoke   # here: the same steps on the CPU
#
# Each check writes OUT/NAME.log and a line "NAME: ok|FAILED (exit N)" to OUT/summary.txt,
# and one failing check never stops the others:
#   env          torch, the device and its name
#   cuda_graphs  greedy decoding with the step replayed as CUDA graphs equals eager decoding
#                (POLYCODER_CUDA_GRAPHS=0), bf16, the bundled model and a random 160M model
#   speculative  --speculate 4 gives the plain completion on the GPU
#   finetune_*   20 steps of full fine-tuning of the bundled model in bf16 and in fp16 (the
#                loss scaler) on this repository's own Python files, and LoRA in bf16
#   qlora        LoRA on a 4-bit base (needs bitsandbytes; skipped with a note without it)
#   train_bf16   with TOKENS_DIR (`polycoder data tokenize` output, carried): 50 steps of
#                pretraining from the bundled model, bf16
#   decode       benchmarks/decode.py --device cuda (ours against transformers, bf16)
# The machine has PyTorch, transformers, peft and tokenizers (its python3); polycoder runs
# from src/ without installing. TOKENS_DIR must travel as real files (the device tool
# carries a symbolic link as a link): copy the shards into a folder .git/info/exclude
# ignores and name it in `carry`; the working tree and the carried paths together stay
# under 64 MiB (the bundled model's 23.3M-token shards are 50 MB: carry part of train/).
set -u
OUT=${1:?usage: scripts/gpu_checks.sh OUT [TOKENS_DIR]}
TOKENS=${2:-}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
STEPS=20
NEW=64
if [ -n "${QUICK:-}" ]; then STEPS=2; NEW=8; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"

check() {  # check NAME COMMAND...: run it, log it, note the outcome
    local name=$1
    shift
    echo "== $name"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local result="ok"
    [ $rc -eq 0 ] || result="FAILED (exit $rc)"
    echo "$name: $result, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 4 "$OUT/$name.log"
}

same_completion() {  # same_completion MODEL_ARGS...: graphs on and off give the same greedy text
    local prompt=$'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    local a b
    a=$($PY -m polycoder generate "$@" --device "$DEVICE" --dtype bfloat16 --prompt "$prompt" --max-new-tokens "$NEW") || return 1
    b=$(POLYCODER_CUDA_GRAPHS=0 $PY -m polycoder generate "$@" --device "$DEVICE" --dtype bfloat16 --prompt "$prompt" \
        --max-new-tokens "$NEW") || return 1
    printf 'graphs:\n%s\neager:\n%s\n' "$a" "$b"
    [ "$a" == "$b" ]
}

speculative() {
    local prompt=$'x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n'
    local a b
    a=$($PY -m polycoder generate --device "$DEVICE" --dtype bfloat16 --prompt "$prompt" --max-new-tokens "$NEW") || return 1
    b=$($PY -m polycoder generate --device "$DEVICE" --dtype bfloat16 --prompt "$prompt" --max-new-tokens "$NEW" \
        --speculate 4) || return 1
    printf 'plain:\n%s\nspeculative:\n%s\n' "$a" "$b"
    [ "$a" == "$b" ]
}

finetune() {  # finetune NAME EXTRA_ARGS...
    local name=$1
    shift
    $PY -m polycoder finetune --model polycoder-tiny --data src/polycoder --out "$OUT/$name" --device "$DEVICE" \
        --max-steps "$STEPS" --batch-size 8 "$@"
}

qlora() {
    if ! $PY -c "import bitsandbytes" 2> /dev/null; then
        echo "bitsandbytes is not installed here: QLoRA not checked (carry its wheel to check it)"
        return 0
    fi
    finetune qlora-run --qlora --dtype bfloat16
}

check env $PY -c "import torch; d = torch.device('$DEVICE'); print(torch.__version__, d, \
torch.cuda.get_device_name(0) if d.type == 'cuda' else 'cpu')"
check cuda_graphs_bundled same_completion
check cuda_graphs_160m same_completion --model polycoder-160m --random-init
check speculative speculative
check finetune_bf16 finetune finetune-bf16 --dtype bfloat16
if [ "$DEVICE" != cpu ]; then  # fp16 training needs a GPU (its loss scaler): refused on the CPU
    check finetune_fp16 finetune finetune-fp16 --dtype float16
fi
check finetune_lora finetune finetune-lora --lora --dtype bfloat16
check qlora qlora
if [ -n "$TOKENS" ]; then
    check train_bf16 $PY -m polycoder train --config configs/polycoder-tiny.yaml --data "$TOKENS" \
        --model src/polycoder/assets/polycoder-tiny --out "$OUT/train-bf16" --max-steps $((STEPS * 5 / 2)) \
        --precision bfloat16 --device "$DEVICE"
fi
if [ -z "${QUICK:-}" ]; then
    check decode $PY benchmarks/decode.py --device "$DEVICE" --json "$OUT/decode-gpu.json"
fi
echo "== summary"
cat "$OUT/summary.txt"
! grep -q FAILED "$OUT/summary.txt"
