"""Inference-time transforms of a loaded model: weight-only int8 / int4, weight layout, threads.

- `quantize(model, "int8")` swaps every `nn.Linear` of the blocks and the output head for an
  `Int8Linear`: int8 weights with one symmetric scale per output channel (absmax / 127),
  kept under the same names (`...query_key_value.weight` is now int8, `...weight_scale`
  sits beside it). On the CPU the product runs in `torch._weight_int8pack_mm`, which reads
  the int8 weights directly (a quarter of fp32's bytes); that kernel is fast with bf16
  activations and about 20x slower with fp32 ones here, so activations are rounded to bf16
  for the product and the result is returned in the model's dtype. Elsewhere the weights
  are dequantized per call (correct, not fast).
- `quantize(model, "int4")`: 4-bit weights in groups of `group_size` input channels with a
  scale and offset a group (asymmetric), through `torch._weight_int4pack_mm_for_cpu`
  (CPU only). Quality drops more than with int8: measure it before using it.
  The input embedding always stays in the model's dtype (it is a lookup, not a product).
- `decode_layout(model)`: for fp32 on the CPU, store each linear weight [out, in] as the
  transpose of a contiguous [in, out] tensor. Shapes, names and values are unchanged;
  a batch-1 product then takes BLAS's gemv path, measured 1.3-2x faster here on the
  50304-wide head than the default layout. bf16 weights keep their layout (transposing
  them measured slower).
- `decode_kernels(model, rows)`: the context a decode step runs in; for a single bf16 row
  on the CPU it picks ATen's bf16 product kernel over oneDNN's and SDPA's math backend
  over its flash kernel (both measured faster there; see the function).
- `physical_cores()` / `set_threads()`: one thread a physical core (hyperthreads share the
  same load/store units, and decoding is bound by memory bandwidth).

References: gpt-fast (weight-only int8/int4 as a module swap, Meta 2023); LLM.int8 and
per-channel absmax quantization (Dettmers et al., 2022). Limits: weights only (activations
and the KV cache stay in the model's dtype); a quantized model is for inference only and
is not saved back to a checkpoint.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from polycoder import kernels
from polycoder.errors import PolycoderError
from polycoder.model import Block, GPTNeoX, RotaryEmbedding

QUANTIZE_MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 [out, in] and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("scale32", torch.ones(out_features, dtype=torch.float32, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # [out]
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, w.device)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        m.scale32.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x, self.weight):  # few rows: our weight-streaming kernel
            return kernels.linear(x, self.weight, self.bias, self.scale32)
        shape = x.shape
        if x.device.type == "cpu":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # the kernel's fast input type
            y = torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(torch.bfloat16)).to(x.dtype)
        else:
            y = F.linear(x.reshape(-1, self.in_features), self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4 bits, groups of `group_size` inputs, a scale and offset a group."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int):
        super().__init__()
        if in_features % group_size:
            raise PolycoderError(f"int4: input width {in_features} does not divide into groups of {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale_zero", torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        if linear.weight.device.type != "cpu":
            raise PolycoderError("int4 runs on the CPU only (torch._weight_int4pack_mm_for_cpu); use int8 elsewhere")
        N, K = linear.weight.shape
        m = cls(K, N, linear.bias is not None, linear.weight.dtype, group_size)
        w = linear.weight.detach().float().reshape(N, K // group_size, group_size)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (hi - lo).clamp_min(1e-8) / 15.0
        q = torch.round((w - lo) / scale).clamp_(0, 15).to(torch.int32).reshape(N, K)
        # The kernel dequantizes (q - 8) * scale + zero, so zero = lo + 8 * scale.
        zero = lo + 8 * scale
        m.weight = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        m.weight_scale_zero = torch.stack([scale.reshape(N, -1).t(), zero.reshape(N, -1).t()], dim=-1).to(torch.bfloat16).contiguous()
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.weight_scale_zero).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Swap the blocks' and the head's `nn.Linear`s for weight-only quantized ones (in place)."""
    if mode not in QUANTIZE_MODES:
        raise PolycoderError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANTIZE_MODES)}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, group_size)
        setattr(parent, attr, new)
    model.quantization = mode
    return model


class FastLinear(nn.Linear):
    """nn.Linear whose few-row products without gradients go to `polycoder.kernels`.

    Same parameters, names and values; everything else (training, prefill, other devices)
    runs PyTorch's F.linear as before.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x, self.weight):
            return kernels.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _fused_activation(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return None


def _kernel_linear(layer: nn.Module) -> tuple | None:
    """(weight, fp32 scale or None, bias or None) of a layer the native kernel can run."""
    if isinstance(layer, Int8Linear):
        return layer.weight, layer.scale32, layer.bias
    if isinstance(layer, nn.Linear):
        return layer.weight, None, layer.bias
    return None


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    # Straight from the module's dicts: nn.Module.__getattr__ is slow on a per-token path.
    t = module._parameters.get(name)
    return t if t is not None else module._buffers.get(name)


class FastBlock(Block):
    """A Block whose one-token cached steps run as one native call (`kernels.BlockPlan`).

    The plan (pointers to this block's weights) is built on the first step and rebuilt
    whenever a weight tensor or its storage changes (`.to()`, `.half()`, which swaps a
    parameter's `.data` under the same object, `quantize`, loading new parameters). The plan
    is never copied: a deep copy or a pickle of the block builds its own on its first step.
    """

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_plan_cache", None)  # raw pointers into this block's tensors: not transferable
        return state

    def _plan(self, dtype: torch.dtype):
        mods = self._modules
        attn, mlp = mods["attention"]._modules, mods["mlp"]._modules
        linears = (attn["query_key_value"], attn["dense"], mlp["dense_h_to_4h"], mlp["dense_4h_to_h"])
        norms = (mods["input_layernorm"], mods["post_attention_layernorm"])
        tensors = [_tensor(m, n) for m in linears for n in ("weight", "bias", "scale32")]
        tensors += [_tensor(n, p) for n in norms for p in ("weight", "bias")]
        key = tuple((id(t), t.data_ptr(), t.dtype) if t is not None else None for t in tensors)
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = None
        activation = _fused_activation(mlp["act"])
        specs = [_kernel_linear(m) for m in linears]
        rope = self.__dict__.get("_rope")
        if (activation is not None and rope is not None and all(s is not None and s[0].is_contiguous() and s[0].dim() == 2
                                                                and s[0].shape[0] >= 4 and s[0].device.type == "cpu" for s in specs)
                and all(_tensor(n, "weight").dtype == dtype and _tensor(n, "bias") is not None for n in norms)
                and self.attention.head_size <= 512):
            plan = kernels.BlockPlan([_tensor(n, p) for n in norms for p in ("weight", "bias")], norms[0].eps, specs,
                                     activation, self.parallel_residual, rope.cos, rope.sin,
                                     self.attention.n_head, linears[2].out_features)
        self.__dict__["_plan_cache"] = (key, plan, tensors)  # tensors: keeps the ids in the key unique
        return plan

    def forward(self, x, cos, sin, pos=None, cache=None, layer: int = 0, kv_len: int = 0, mask=None):
        B, T, C = x.shape
        if (cache is not None and T == 1 and B <= kernels.MAX_ROWS and x.device.type == "cpu"
                and not torch.is_grad_enabled() and kernels.available()):
            plan = self._plan(x.dtype)
            k_cache, v_cache = cache.k[layer][:B], cache.v[layer][:B]
            if (plan is not None and plan.dtype == x.dtype and k_cache.dtype == x.dtype
                    and k_cache.shape[2] <= kernels.MAX_CACHE_LEN and k_cache.is_contiguous() and v_cache.is_contiguous()):
                return plan.run(x.view(B, C), k_cache, v_cache, pos[:, 0]).view(B, 1, C)
        return super().forward(x, cos, sin, pos, cache, layer, kv_len, mask)


class FastGPTNeoX(GPTNeoX):
    """A GPTNeoX whose one-token cached steps run all blocks in one native call.

    The blocks' plans (`FastBlock._plan`, checked on every step) are joined into one
    `kernels.StackPlan`; the embedding, the final LayerNorm and the head stay PyTorch
    modules (the head a FastLinear). Any other call, or a step the plans cannot take (a
    block without a plan, a cache in another dtype), runs GPTNeoX.forward, which still
    routes each block through FastBlock.
    """

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_stack_cache", None)  # raw pointers: not transferable
        return state

    def forward(self, input_ids, pos=None, cache=None, kv_len=None, select=None, targets=None):
        B, T = input_ids.shape
        if (cache is not None and pos is not None and T == 1 and select is None and targets is None
                and B <= kernels.MAX_ROWS and input_ids.device.type == "cpu" and not torch.is_grad_enabled()
                and kernels.available()):
            trunk = self.gpt_neox
            x = trunk.embed_in(input_ids)  # [B, 1, C]
            stack = self._stack(x.dtype)
            k0 = cache.k[0]
            if (stack is not None and k0.dtype == x.dtype and k0.shape[2] <= kernels.MAX_CACHE_LEN
                    and all(t.is_contiguous() for t in cache.k) and all(t.is_contiguous() for t in cache.v)):
                y = stack.run(x.view(B, -1), cache.k, cache.v, pos[:, 0])  # [B, C]
                return self.embed_out(trunk.final_layer_norm(y.view(B, 1, -1)))  # [B, 1, V]
        return super().forward(input_ids, pos, cache, kv_len, select, targets)

    def _stack(self, dtype: torch.dtype):
        layers = self.gpt_neox.layers
        if not all(type(b) is FastBlock for b in layers):
            return None
        plans = [b._plan(dtype) for b in layers]
        key = tuple(map(id, plans))
        cached = self.__dict__.get("_stack_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        stack = kernels.StackPlan(plans) if kernels.StackPlan.compatible(plans) and plans[0].dtype == dtype else None
        self.__dict__["_stack_cache"] = (key, stack, plans)  # plans: keeps the ids in the key unique
        return stack


def prepare_decode(model: nn.Module) -> nn.Module:
    """Make a model's decode steps fast on this machine (in place; idempotent).

    With the native kernels available (CPU with AVX-512 and a C compiler), the model
    becomes a FastGPTNeoX (all blocks of a decode step in one native call), every plain
    nn.Linear a FastLinear and every Block a FastBlock: class changes, nothing is
    copied or renamed, and each falls back to the parent's forward wherever the kernels do
    not apply (training, prefill, GPU, more than `kernels.MAX_ROWS` rows, an activation
    other than GELU). Without the kernels, fp32 weights take `decode_layout`,
    PyTorch's faster gemv layout.
    """
    if getattr(model, "_decode_prepared", False):
        return model
    if kernels.available():
        # fp32 cos/sin tables built afresh: a bf16 model's own tables were rounded to bf16
        # by .to(dtype), and the kernel reads fp32.
        rope = RotaryEmbedding(model.config)
        if type(model) is GPTNeoX:
            model.__class__ = FastGPTNeoX
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = FastLinear
            elif type(m) is Block:
                m.__class__ = FastBlock
                m.__dict__["_rope"] = rope  # a plain reference, not a submodule
    else:
        decode_layout(model)
    model._decode_prepared = True
    return model


@torch.no_grad()
def decode_layout(model: nn.Module) -> nn.Module:
    """Store fp32 CPU linear weights transposed (same shape, names and values): faster gemv."""
    moved: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            if m.weight.is_contiguous():
                new = nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=m.weight.requires_grad)
                moved[id(m.weight)] = new
                m.weight = new
    for m in model.modules():  # a tied input embedding follows its head
        if isinstance(m, nn.Embedding) and id(m.weight) in moved:
            m.weight = moved[id(m.weight)]
    return model


def decode_kernels(model: nn.Module, rows: int):
    """The context to run a decode step of `rows` tokens in: the fastest CPU kernels for it.

    Only single-token steps with bf16 weights on the CPU change; measured here (one thread,
    polycoder-160m shapes):
    - products: torch sends bf16 products to oneDNN, whose batch-1 path was 1.6x slower
      than ATen's own bf16 kernel (decode step 78 vs 48 ms), while oneDNN wins from 4 rows
      up (8 rows: 151 vs 352 ms; 2 rows: even). So oneDNN is off for a 1-row step.
    - attention: SDPA's CPU flash kernel took 1.8 ms for one bf16 query over 600 keys
      (12 heads) against 0.7 ms for SDPA's math backend, which is chosen for a 1-row step;
      at 8 rows flash is faster (10 vs 29 ms) and stays. fp32 keeps flash throughout.
    """
    w = model.gpt_neox.embed_in.weight
    if rows == 1 and w.dtype == torch.bfloat16 and w.device.type == "cpu":
        return _bf16_single_row()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _bf16_single_row():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with _onednn_off(), sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def _onednn_off():
    # The process-wide switch behind torch.backends.mkldnn.flags(enabled=False), without the
    # TF32 warning that flags() emits on every CPU build. Process-wide: run decode steps of
    # one process from one thread at a time (the engine does).
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


def physical_cores() -> int:
    """Physical cores this process may run on (logical CPUs / threads per core)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read().strip()
        per_core = sum(int(b) - int(a) + 1 if "-" in part else 1
                       for part in siblings.split(",") for a, _, b in [part.partition("-")])
    except OSError:
        per_core = 1
    return max(1, logical // max(1, per_core))


def set_threads(n: int | None = None) -> int:
    """torch's intra-op threads: n, or one a physical core. Returns the number set."""
    n = n or physical_cores()
    torch.set_num_threads(n)
    return n
