"""A small driver for llama.cpp (through llama-cpp-python's low-level API) to check GGUF exports.

`LlamaCpp(path)` opens a GGUF file and gives what the checks and benchmarks need: token ids
(`tokenize`), the logits of every position of a sequence (`logits`) and greedy decoding
(`greedy`). It uses llama-cpp-python's internal wrappers (`llama_cpp._internals`) rather
than the `Llama` class, for two pitfalls of llama-cpp-python 0.3.36 met on this project:
- q8_0 can crash in prefill when llama.cpp repacks weights for AMX; repacking is turned off
  here (`use_extra_bufts = False` in the model parameters), which `Llama(...)` cannot do;
- `Llama.eval` leaves `scores` at zero unless `logits_all=True`; here we ask for the logits
  of the positions we need in the batch and read them with `llama_get_logits_ith`.

llama-cpp-python is optional (the `export` extra does not pull it: it builds from source,
about 20 minutes on a small machine; scripts/build_llama_cpp_wheel.sh caches a wheel).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np

from polycoder.errors import PolycoderError


def available() -> bool:
    """True when llama-cpp-python can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """One llama.cpp model and context (one sequence) on the CPU."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 512,
        threads: int | None = None,
        n_batch: int = 512,
        kv_f32: bool = False,
        verbose: bool = False,
    ):
        """`kv_f32` keeps the KV cache in f32 (llama.cpp's default is f16), for exact comparisons."""
        if not available():
            raise PolycoderError(
                "llama-cpp-python is not installed; run scripts/build_llama_cpp_wheel.sh and pip install the wheel"
            )
        # Deferred: optional (built from source by `make llama-cpp`)
        import llama_cpp
        from llama_cpp import _internals

        path = Path(path)
        if not path.is_file():
            raise PolycoderError(f"no GGUF file at {path}")
        self._lib = llama_cpp
        if not verbose:
            _silence(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if hasattr(mparams, "use_extra_bufts"):
            mparams.use_extra_bufts = False  # no AMX/other weight repacking: see the module docstring
        self.model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=verbose)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        n = threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = n
        cparams.n_threads_batch = n
        if kv_f32:
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0  # disabled: the CPU flash-attention path rounds Q to f16
        self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=verbose)
        self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=verbose)
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.n_vocab = self.model.n_vocab()

    # ---- tokens ---------------------------------------------------------------------

    def tokenize(self, text: str | bytes) -> list[int]:
        """llama.cpp's ids for `text`: no BOS added, special-token text not parsed."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        if not data:
            return []
        return self.model.tokenize(data, add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> bytes:
        return self.model.detokenize(ids, special=True)

    # ---- running --------------------------------------------------------------------

    def reset(self) -> None:
        self.ctx.kv_cache_clear()
        self._n_past = 0

    def _decode(self, ids: list[int], all_logits: bool) -> np.ndarray:
        """Feed `ids` after what is in the cache; logits of every fed position or the last one."""
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self.batch.set_batch(chunk, n_past=self._n_past, logits_all=all_logits)
            self.ctx.decode(self.batch)
            self._n_past += len(chunk)
            wanted = range(len(chunk)) if all_logits else [len(chunk) - 1]
            for i in wanted:
                p = self.ctx.get_logits_ith(i)
                rows.append(np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).copy())
        return np.stack(rows) if all_logits else rows[-1][None]

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [T, V] of every position of `ids`, from an empty cache."""
        if len(ids) > self.n_ctx:
            raise PolycoderError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        self.reset()
        return self._decode(list(ids), all_logits=True)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy continuation (argmax of each step's logits), like our temperature 0."""
        self.reset()
        last = self._decode(list(ids), all_logits=False)[0]
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(last))
            out.append(nxt)
            if nxt in stop_ids or len(ids) + len(out) >= self.n_ctx:
                break
            last = self._decode([nxt], all_logits=False)[0]
        return out

    def close(self) -> None:
        for obj in ("batch", "ctx", "model"):
            o = getattr(self, obj, None)
            if o is not None:
                o.close()
                setattr(self, obj, None)

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SILENCED = []


def _silence(llama_cpp) -> None:
    """Route llama.cpp's log lines to nowhere (they go to stderr by default)."""
    if _SILENCED:
        return
    cb = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    _SILENCED.append(cb)  # keep the callback alive
