"""`polycoder export gguf`: a GPT-NeoX model as a GGUF file that llama.cpp runs, tokenizer included.

What is written (llama.cpp architecture "gptneox"; llama.cpp's `src/models/gptneox.cpp`
and `convert_hf_to_gguf.py` (class GPTNeoXModel) are the references):
- metadata: `gptneox.context_length`, `.embedding_length`, `.block_count`,
  `.feed_forward_length`, `.attention.head_count`, `.rope.dimension_count` (rotary dims),
  `.rope.freq_base`, `.attention.layer_norm_epsilon`, `.use_parallel_residual`;
- tensors: `TENSOR_NAMES` / `LAYER_TENSOR_NAMES` below, one name each; the one reshape is
  the fused QKV: GPT-NeoX interleaves it per head (q, k, v of head 0, then head 1, ...),
  llama.cpp splits it into three contiguous blocks (all q, all k, all v);
- the tokenizer, so that llama.cpp tokenizes exactly as `polycoder.tokenizer` does:
  `tokenizer.ggml.model` "gpt2", `tokenizer.ggml.pre` "gpt-2" (llama.cpp's name for
  GPT-2's own pre-tokenizer regex; unknown names are refused), the tokens of the padded
  vocabulary (`[PAD{i}]` for the unused rows, as llama.cpp's converter does), their types
  (special tokens CONTROL so that text is never parsed into them, added tokens such as
  `polycoder tokenizer train`'s whitespace runs USER_DEFINED, which llama.cpp matches
  before BPE as `tokenizers` does), and the merges our tokenizer really uses: for
  PolyCoder's headerless merges file that is without its first line `Ġ Ġ` (docs/design.md), so
  a run of N spaces stays N tokens in llama.cpp too.
- fill-in-the-middle, where the tokenizer has the sentinels (`polycoder.fim`): their ids
  under llama.cpp's keys `tokenizer.ggml.fim_pre_token_id`, `fim_suf_token_id`,
  `fim_mid_token_id`, `fim_pad_token_id` (gguf-py's `Keys.Tokenizer.FIM_*`; llama.cpp's
  `llama_vocab_fim_pre/suf/mid/pad`, which its `/infill` endpoint and `llama-cli --fim`
  read), and under the older `prefix_token_id`, `suffix_token_id`, `middle_token_id` that
  earlier llama.cpp builds read; the sentinels are CONTROL tokens like every special token.
  (llama.cpp would also guess them from the token texts `<fim_prefix>`...; the keys make it
  explicit.) llama.cpp treats `<fim_pad>` as an end-of-generation token.
- precision: `f32`, `f16` or `q8_0` for matrices; vectors (norms, biases) stay f32, and in
  q8_0 a matrix whose rows are not a multiple of 32 falls back to f16, as llama.cpp does.

After writing, the file is run once as a smoke test: through llama.cpp (llama-cpp-python)
when it is installed (same token ids as ours on a code sample, logits compared with ours),
else by reading the GGUF back with the `gguf` package and checking every tensor against
the source weights.

Limits: llama.cpp's GPT-NeoX graph always uses its GELU (tanh form, tabulated in f16 on
the CPU), where PolyCoder uses the exact erf GELU: f32 logits agree to about 5e-3 (logits
of std 1.6; with an f32 KV cache), not bit for bit. It needs biases on every linear layer (PolyCoder has them). Text with `\r`,
which PolyCoder's vocabulary cannot encode (we read it as `\n`, see polycoder.tokenizer),
or bytes that are not UTF-8 are tokenized differently by llama.cpp, which drops them.

The verb's module: torch and our modules that import it are imported inside the
functions that run the model, so that `polycoder export gguf --help` reads the options without
importing torch (about 2 s); tests/test_structure.py allows this for the verb modules only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import gguf
import numpy as np
from tqdm import tqdm

from polycoder.errors import PolycoderError
from polycoder.export import llamacpp
from polycoder.files import atomic_path
from polycoder.fim import FimIds
from polycoder.options import Fields, ModelOptions
from polycoder.tokenizer import EOD_TOKEN

if TYPE_CHECKING:
    import torch

OutType = Literal["f32", "f16", "q8_0"]
ARCH = "gptneox"
# llama.cpp's name for the GPT-2 pre-tokenizer regex (llama-vocab.cpp: "gpt-2" ->
# LLAMA_VOCAB_PRE_TYPE_GPT2, whose regex is GPT-2's `'s|'t|...|\s+(?!\S)|\s+`).
PRE_TOKENIZER = "gpt-2"

# our (transformers') name -> GGUF name
TENSOR_NAMES = {
    "gpt_neox.embed_in.weight": "token_embd.weight",
    "gpt_neox.final_layer_norm.weight": "output_norm.weight",
    "gpt_neox.final_layer_norm.bias": "output_norm.bias",
    "embed_out.weight": "output.weight",
}
# gpt_neox.layers.{i}.<key> -> blk.{i}.<value>
LAYER_TENSOR_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "input_layernorm.bias": "attn_norm.bias",
    "attention.query_key_value.weight": "attn_qkv.weight",
    "attention.query_key_value.bias": "attn_qkv.bias",
    "attention.dense.weight": "attn_output.weight",
    "attention.dense.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "post_attention_layernorm.bias": "ffn_norm.bias",
    "mlp.dense_h_to_4h.weight": "ffn_up.weight",
    "mlp.dense_h_to_4h.bias": "ffn_up.bias",
    "mlp.dense_4h_to_h.weight": "ffn_down.weight",
    "mlp.dense_4h_to_h.bias": "ffn_down.bias",
}
GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
SMOKE_TEXT = "def fibonacci(n):\n\tif n < 2:\n\t\treturn n  # base case\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


def qkv_to_gguf(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-NeoX's per-head interleaved fused QKV -> llama.cpp's [all q; all k; all v]."""
    rest = t.shape[1:]
    # weight [3C, C] = [H, 3, hs, C] (bias [3C] = [H, 3, hs]) -> [3, H, hs, ...] -> [3C, ...]
    return t.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def qkv_from_gguf(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `qkv_to_gguf`."""
    rest = t.shape[1:]
    return t.reshape(3, n_head, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def gguf_name(name: str) -> str:
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    parts = name.split(".", 3)  # gpt_neox, layers, i, key
    if len(parts) == 4 and parts[:2] == ["gpt_neox", "layers"] and parts[3] in LAYER_TENSOR_NAMES:
        return f"blk.{parts[2]}.{LAYER_TENSOR_NAMES[parts[3]]}"
    raise PolycoderError(f"tensor {name!r} has no GGUF name; is this a GPT-NeoX model?")


def _ggml_type(outtype: OutType, shape: tuple[int, ...]):
    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return T.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    a = t.detach().float().cpu().numpy()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


# ---- tokenizer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVocab:
    """What llama.cpp needs to tokenize as we do."""

    tokens: list[str]
    """One string per row of the (padded) embedding, id order; byte-level symbols as in vocab.json."""
    types: list[int]
    """gguf.TokenType per token: NORMAL, CONTROL (special), USER_DEFINED (added), UNUSED (padding rows)."""
    merges: list[str]
    """BPE merges in rank order, "left right", exactly those our tokenizer applies."""
    bos_id: int
    """Id that starts a document (`<|endoftext|>`)."""
    eos_id: int
    """Id that ends one (the same `<|endoftext|>` in PolyCoder)."""
    pad_id: int
    """Padding id (`<|padding|>`)."""
    fim: FimIds | None = None
    """The fill-in-the-middle sentinels' ids, where the tokenizer has them."""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.types):
            raise ValueError("tokens and types differ in length")


def gguf_vocab(tokenizer, n_vocab: int) -> GGUFVocab:
    """The tokenizer's vocabulary padded to the model's `n_vocab` rows, with its merges."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise PolycoderError(f"GGUF export needs a byte-level BPE tokenizer; this one is {model.get('type')!r}")
    pre = spec.get("pre_tokenizer") or {}
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        raise PolycoderError(
            "GGUF export supports GPT-2's byte-level pre-tokenizer (ByteLevel, use_regex, no prefix space) only; "
            f"this tokenizer has {json.dumps(pre)[:200]}: llama.cpp could not split text as it does"
        )
    if spec.get("normalizer"):
        raise PolycoderError("GGUF export: the tokenizer has a normalizer, which llama.cpp's gpt2 vocabulary cannot reproduce")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise PolycoderError(f"the tokenizer has {len(vocab)} tokens but the model only {n_vocab} embedding rows")
    added = tokenizer.backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    TT = gguf.TokenType
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TT.CONTROL if added[i].special else TT.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TT.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # A byte-level tokenizer with no merges (random presets' default). llama.cpp's BPE
        # loader refuses a file without the merges key, and gguf-py cannot write an empty
        # array; this one merge never applies (BPE symbols start as single characters and
        # no merge ever builds `<|endoftext|>`), so llama.cpp still tokenizes byte by byte.
        merges = [f"{EOD_TOKEN} {EOD_TOKEN}"]
    return GGUFVocab(tokens, [int(t) for t in types], merges, tokenizer.eod_id, tokenizer.eod_id, tokenizer.pad_id,
                     tokenizer.fim)


def fim_metadata(fim: FimIds | None) -> dict[str, int]:
    """llama.cpp's metadata keys for the FIM sentinels (current and deprecated), with their ids."""
    if fim is None:
        return {}
    K = gguf.Keys.Tokenizer
    return {K.FIM_PRE_ID: fim.prefix, K.FIM_SUF_ID: fim.suffix, K.FIM_MID_ID: fim.middle, K.FIM_PAD_ID: fim.pad,
            K.PREFIX_ID: fim.prefix, K.SUFFIX_ID: fim.suffix, K.MIDDLE_ID: fim.middle}


# ---- writing -----------------------------------------------------------------------------


def check_exportable(config) -> None:
    if config.hidden_act not in GELU_ACTIVATIONS:
        raise PolycoderError(
            f"llama.cpp's GPT-NeoX graph always uses GELU; this model uses {config.hidden_act!r} and cannot be exported"
        )
    if not config.attention_bias:
        raise PolycoderError("llama.cpp's GPT-NeoX graph needs attention biases; this model has attention_bias false")


def write_gguf(
    model, tokenizer, out: str | Path, outtype: OutType = "f16", name: str | None = None, progress: bool = True
) -> Path:
    """Write `model` (polycoder.model.GPTNeoX) and `tokenizer` to `out` as a GGUF file.

    Tensors are converted and written one at a time, so memory stays at about the model's
    own size plus one tensor.
    """
    if outtype not in ("f32", "f16", "q8_0"):
        raise PolycoderError(f"unknown --outtype {outtype!r}; choose f32, f16 or q8_0")
    cfg = model.config
    check_exportable(cfg)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    state = dict(model.state_dict())
    names = ["gpt_neox.embed_in.weight"]
    for i in range(cfg.n_layer):
        names += [f"gpt_neox.layers.{i}.{k}" for k in LAYER_TENSOR_NAMES]
    names += ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"]
    missing = [n for n in names if n not in state]
    if missing:
        raise PolycoderError(f"the model lacks {', '.join(missing[:3])}; cannot export it to GGUF")

    def converted(n: str) -> torch.Tensor:
        t = state[n]
        if n.endswith("attention.query_key_value.weight") or n.endswith("attention.query_key_value.bias"):
            t = qkv_to_gguf(t, cfg.n_head)
        return t

    T = gguf.GGMLQuantizationType
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            w.add_name(name or cfg.name)
            w.add_file_type(int(file_type))
            w.add_context_length(cfg.block_size)
            w.add_embedding_length(cfg.n_embd)
            w.add_block_count(cfg.n_layer)
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_head_count(cfg.n_head)
            w.add_rope_dimension_count(cfg.rotary_dims)
            w.add_rope_freq_base(float(cfg.rope_base))
            w.add_layer_norm_eps(float(cfg.layer_norm_eps))
            w.add_parallel_residual(bool(cfg.parallel_residual))
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(PRE_TOKENIZER)
            w.add_token_list(vocab.tokens)
            w.add_token_types(vocab.types)
            w.add_token_merges(vocab.merges)
            w.add_bos_token_id(vocab.bos_id)
            w.add_eos_token_id(vocab.eos_id)
            w.add_pad_token_id(vocab.pad_id)
            for key, token_id in fim_metadata(vocab.fim).items():
                w.add_uint32(key, token_id)
            # We never add BOS/EOS implicitly: prompts are passed as they are (our generate does the same).
            w.add_add_bos_token(False)
            w.add_add_eos_token(False)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)

            # Pass 1: tensor infos (shapes and types), so the data can then be streamed.
            qtypes = {}
            for n in names:
                shape = tuple(state[n].shape)
                q = _ggml_type(outtype, shape)
                qtypes[n] = q
                block, type_size = gguf.GGML_QUANT_SIZES[q]
                nbytes = int(np.prod(shape)) // block * type_size
                if q == T.Q8_0:
                    w.add_tensor_info(gguf_name(n), gguf.quant_shape_to_byte_shape(shape, q), np.dtype(np.uint8), nbytes,
                                      raw_dtype=q)
                else:
                    dtype = np.dtype(np.float32 if q == T.F32 else np.float16)
                    w.add_tensor_info(gguf_name(n), shape, dtype, nbytes, raw_dtype=q)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            # Pass 2: the data, in the same order.
            for n in tqdm(names, desc=f"GGUF {outtype}", unit="tensor", disable=not progress):
                w.write_tensor_data(_encode(converted(n), qtypes[n]))
        finally:
            w.close()
    return out


# ---- checks ------------------------------------------------------------------------------


def read_back(path_or_reader) -> dict[str, np.ndarray]:
    """The tensors of a GGUF file (a path or a `gguf.GGUFReader`) as float32 arrays in our names and layout (QKV restored)."""
    import torch

    # Opening parses every metadata item (100k tokens and merges): seconds; reuse a reader where possible.
    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(str(path_or_reader))
    n_head = int(reader.fields[f"{ARCH}.attention.head_count"].parts[-1][0])
    inverse = {v: k for k, v in TENSOR_NAMES.items()}
    out = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml order -> numpy order
        a = a.reshape(shape)
        if t.name in inverse:
            name = inverse[t.name]
        else:
            _, i, rest = t.name.split(".", 2)
            key = next(k for k, v in LAYER_TENSOR_NAMES.items() if v == rest)
            name = f"gpt_neox.layers.{i}.{key}"
        if "query_key_value" in name:
            a = qkv_from_gguf(torch.from_numpy(a), n_head).numpy()
        out[name] = a
    return out


def check_tensors(path: str | Path, model, outtype: OutType) -> float:
    """Largest error of any tensor read back from the GGUF against the model, relative to its max |value|."""
    back = read_back(path)
    state = model.state_dict()
    worst = 0.0
    for name, a in back.items():
        ref = state[name].detach().float().cpu().numpy()
        if a.shape != ref.shape:
            raise PolycoderError(f"GGUF check: {name} has shape {a.shape}, the model {ref.shape}")
        scale = float(np.abs(ref).max()) or 1.0
        worst = max(worst, float(np.abs(a - ref).max()) / scale)
    missing = sorted(set(state) - set(back))
    if missing:
        raise PolycoderError(f"GGUF check: tensors missing from the file: {', '.join(missing[:3])}")
    limit = {"f32": 0.0, "f16": 1e-3, "q8_0": 1e-2}[outtype]
    if worst > limit:
        raise PolycoderError(f"GGUF check: a tensor differs from the source by {worst:.2e} of its range "
                             f"(> {limit:g} for {outtype})")
    return worst


def smoke_test(path: Path, model, tokenizer, outtype: OutType, text: str = SMOKE_TEXT, threads: int | None = None) -> dict:
    """Run the exported file once: through llama.cpp if installed, else read it back."""
    import torch

    if not llamacpp.available():
        worst = check_tensors(path, model, outtype)
        return {"engine": "gguf reader (llama-cpp-python not installed)", "max_rel_tensor_error": worst}
    ids = tokenizer.encode(text)
    with llamacpp.LlamaCpp(path, n_ctx=min(model.config.block_size, 512), threads=threads, kv_f32=True) as llm:
        theirs = llm.tokenize(text)
        if theirs != ids:
            raise PolycoderError(
                f"llama.cpp tokenizes the smoke-test text differently from polycoder ({len(theirs)} vs {len(ids)} tokens); "
                "the exported vocabulary is wrong, please report this"
            )
        ids = ids[: min(model.config.block_size, 512) - 16]
        lc = llm.logits(ids)
        their_greedy = llm.greedy(ids, 16)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float().numpy()
        seq = list(ids)
        for _ in range(16):  # plain greedy loop, no cache: the reference
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    our_greedy = seq[len(ids):]
    same = next((i for i, (a, b) in enumerate(zip(our_greedy, their_greedy)) if a != b), len(our_greedy))
    diff = float(np.abs(lc - ours).max())
    agree = float((lc.argmax(-1) == ours.argmax(-1)).mean())
    return {"engine": "llama.cpp", "tokens": len(ids), "same_token_ids": True,
            "max_abs_logit_diff": diff, "argmax_agreement": agree, "greedy_same_prefix": f"{same}/16"}


# ---- the CLI verb ------------------------------------------------------------------------


def export_gguf(
    out: Path,
    *,
    model_options: Annotated[ModelOptions | None, Fields("model", "tokenizer", "random_init")] = None,
    outtype: OutType = "f16",
    check: bool = True,
    threads: int | None = None,
) -> dict:
    """Export a model to a GGUF file for llama.cpp (f32, f16 or q8_0), tokenizer included.

    Args:
        out: the .gguf file to write.
        model_options: the model (--model, --tokenizer, --random-init); its precision follows --outtype.
        outtype: precision of the matrices: f32, f16 or q8_0 (vectors stay f32).
        check: run the file once afterwards (llama.cpp when installed, else read it back).
        threads: CPU threads for the llama.cpp check (default: all cores).
    """
    from polycoder.checkpoint import load

    t0 = time.perf_counter()
    options = model_options or ModelOptions()
    if options.quantize:
        raise PolycoderError("export gguf quantizes with --outtype (f32, f16, q8_0); leave out --quantize")
    dtype = "float16" if outtype == "f16" else "float32"
    net, tok = load(replace(options, dtype=dtype, device="cpu"))
    model = options.model
    path = write_gguf(net, tok, out, outtype)
    summary = {"out": str(path), "outtype": outtype, "bytes": path.stat().st_size, "model": str(model or "bundled"),
               "seconds_export": round(time.perf_counter() - t0, 2)}
    if check:
        if dtype != "float32":
            net = net.float()
        summary["check"] = smoke_test(path, net, tok, outtype, threads=threads)
    print(f"wrote {path} ({summary['bytes'] / 2**20:.1f} MiB, {outtype}) in {summary['seconds_export']} s")
    if check:
        print("check: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary["check"].items()))
    return summary
