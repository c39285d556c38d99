"""Weight-only quantization of a loaded model: int8 and int4 linear layers, swapped in place.

- `quantize(model, "int8")` puts an `Int8Linear` (with `setattr`, as gpt-fast does) in the
  place of every `nn.Linear` of the blocks and of the output head: int8 weights with one
  symmetric scale per output channel (absmax / 127), kept under the same names
  (`...query_key_value.weight` is now int8, `...weight_scale` sits beside it). On the CPU
  the product runs in `torch._weight_int8pack_mm`, which reads the int8 weights directly
  (a quarter of fp32's bytes); that kernel is fast with bf16 activations and much slower
  with fp32 ones, so activations are rounded to bf16 for the product and the result is
  returned in the model's dtype. It streams the weights well but multiplies slowly: on a
  CPU that multiplies bf16 natively (AVX512-BF16 or AMX), a product of `WIDEN_FROM_ROWS`
  rows or more (a prompt's prefill) widens the int8 weights to bf16 (exactly: every int8 is
  a bf16) and runs oneDNN's bf16 product, scaling the result in fp32 after; where bf16 is
  not native (x86 without those, and ARM, unmeasured) that product is slower than the int8
  kernel, which keeps those CPUs' prefills
  (figures: docs/benchmarks/README.md). Elsewhere than the CPU the weights are dequantized
  per call (correct, not fast). A decode step of a few rows reads the int8 weights in the
  native kernels instead (`polycoder.backend.native_decode`).
- `quantize(model, "int4")`: 4-bit weights in groups of `group_size` input channels with a
  scale and offset a group (asymmetric), through `torch._weight_int4pack_mm_for_cpu`
  (CPU only). A memory option: half of int8's weight memory, but decoding is slower than
  with int8 (PyTorch's int4 product, not our native kernels: docs/benchmarks/README.md),
  and quality drops more than with int8: measure it before using it.
  The input embedding always stays in the model's dtype (it is a lookup, not a product).

References: gpt-fast (weight-only int8/int4 as a module swap, Meta 2023); LLM.int8 and
per-channel absmax quantization (Dettmers et al., 2022). Limits: weights only (activations
and the KV cache stay in the model's dtype); a quantized model is for inference only and
is not saved back to a checkpoint.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from polycoder import cpu
from polycoder.errors import PolycoderError

QUANTIZE_MODES = ("int8", "int4")

# From this many rows on, widening the weights to bf16 costs less than the int8 kernel's
# slower products saves, where bf16 products are native (measured crossover 16-32 rows on
# the PolyCoder-160M shapes, Zen 4: docs/benchmarks/README.md).
WIDEN_FROM_ROWS = 32


@functools.cache
def bf16_products_native() -> bool:
    """Whether this x86 CPU multiplies bf16 matrices at bf16's rate (AVX512-BF16 or AMX-BF16,
    through oneDNN); without them oneDNN widens bf16 to fp32 and runs slower than fp32. A
    ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) below those levels counts as
    their absence. ARM CPUs with BF16 are not counted (unmeasured): they keep the int8 kernel."""
    flags = cpu.flags().split()
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    allowed = limit in ("ALL", "DEFAULT") or any(level in limit for level in ("BF16", "AMX", "FP16", "AVX10"))
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and allowed and torch.backends.mkldnn.is_available()


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 [out, in] and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))
        # The scales in fp32, for the native kernels (polycoder.kernels.linear reads them so).
        self.register_buffer("scale32", torch.ones(out_features, dtype=torch.float32, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
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

    def packed_product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, in] (bf16) times the int8 weights through torch's int8 kernel, in bf16."""
        return torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(torch.bfloat16))

    def widened_product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, in] (bf16) times the weights widened to bf16 (exact), scaled in fp32 after."""
        return F.linear(x2, self.weight.to(torch.bfloat16)).float() * self.scale32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.device.type == "cpu":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # both products' fast input type
            if x2.size(0) >= WIDEN_FROM_ROWS and bf16_products_native():
                y = self.widened_product(x2).to(x.dtype)
            else:
                y = self.packed_product(x2).to(x.dtype)
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
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
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
        m.weight_scale_zero = (
            torch.stack([scale.reshape(N, -1).t(), zero.reshape(N, -1).t()], dim=-1).to(torch.bfloat16).contiguous()
        )
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
