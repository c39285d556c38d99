"""The decode step on the CPU in one native call: every block of the model for up to 8 rows.

`NativeDecode(model, cache)` is a decode step (`polycoder.backend.decode.DecodeStep`) that
runs the embedding lookup in PyTorch, the output head through the native weight-streaming
product (`polycoder.backend.few_rows`) and all blocks in one call of the
native kernels (`polycoder.kernels.StackPlan`: fused LayerNorm + QKV + rotary + KV write +
attention + dense + MLP with the residuals, fp32 / bf16 / int8 weights; see kernels.h).

Each block's plan (pointers to its weights) is built on the first step and rebuilt
whenever a weight tensor or its storage changes (`.to()`, `.half()`, which swaps a
parameter's `.data` under the same object, `quantize`, loading new parameters): the plans
are keyed by the tensors' identities and data pointers, checked on every step. A step the
kernels cannot take (more than `kernels.MAX_ROWS` rows, a cache in another dtype or longer
than `kernels.MAX_CACHE_LEN`, an activation other than GELU, a layer the kernel does not
know, gradients) runs the model's cached forward with `FewRowOps` (native products where
they apply). Making the step puts the linear weights back in the layout the kernels read
(`standard_layout`), whatever decode step was made for the model before.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from polycoder import kernels
from polycoder.backend.decode import EagerDecode, standard_layout
from polycoder.backend.few_rows import FEW_ROW_OPS, kernel_linear, tensor_of
from polycoder.model import TORCH_OPS, Block, GPTNeoX, KVCache, RotaryEmbedding


def _fused_activation(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return None


class NativeDecode:
    """All blocks of a decode step in one native call; see the module."""

    writes_free_rows = False

    def __init__(self, model: GPTNeoX, cache: KVCache):
        self.model, self.cache = model, cache
        standard_layout(model)
        # Steps the one native call does not take: native products where they apply (a few
        # rows), PyTorch's otherwise (more rows: the check per product would be wasted).
        self.fallback_few_rows = EagerDecode(model, cache, ops=FEW_ROW_OPS)
        self.fallback = EagerDecode(model, cache, ops=TORCH_OPS)
        # fp32 cos/sin tables built afresh: a bf16 model's own tables were rounded to bf16
        # by .to(dtype), and the kernels read fp32.
        self.rope = RotaryEmbedding(model.config)
        self._plans: dict[int, tuple] = {}  # id(block) -> (key, plan or None, tensors kept alive)
        self._stack: tuple | None = None  # (plan ids, StackPlan or None, plans kept alive)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        y = self._positions(x, pos[:, 0])  # row b in cache row b
        if y is not None:
            return self._head(y)  # [B, V]
        return (self.fallback_few_rows if x.size(0) <= kernels.MAX_ROWS else self.fallback)(x, pos, kv_len)

    def verify(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """T positions of each of B rows in one native call where B * T rows fit the kernels:
        row b's positions share cache row b (the kernel writes every key before any row
        attends); else the model's cached forward with the few-row products."""
        B, T = x.shape
        y = self._positions(x.reshape(B * T, 1), pos.reshape(-1), torch.arange(B).repeat_interleave(T))
        if y is None:
            return self.fallback_few_rows.verify(x, pos)
        return self._head(y).view(B, T, -1)

    def extend(self, x: torch.Tensor, pos: torch.Tensor, row: int) -> torch.Tensor | None:
        """The end of one prompt, x [1, T] at positions pos [1, T], into cache row `row` in one
        native call (its earlier positions already there: the prompt cache's), as `verify` runs
        a row's drafts: the next-token logits of the last position [1, V] (fp32), the output
        head run for it alone; None where the kernels cannot take it (more than
        `kernels.MAX_ROWS` positions, ...), for the caller's prefill to run it."""
        T = x.size(1)
        y = self._positions(x.reshape(T, 1), pos.reshape(-1), torch.full((T,), row, dtype=torch.long))
        return None if y is None else self._head(y[-1:])

    def _head(self, y: torch.Tensor) -> torch.Tensor:
        """Last hidden states [N, C] -> next-token logits [N, V] (fp32)."""
        return FEW_ROW_OPS.linear(self.model.embed_out, self.model.gpt_neox.final_layer_norm(y)).float()

    def _positions(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Tokens x [N, 1] at positions pos [N] of cache rows `rows` [N] (default 0..N-1) through
        every block in one native call (every key written before any position attends): the
        last hidden states [N, C], or None where the kernels cannot take them."""
        N = x.size(0)
        cache = self.cache
        if not (N <= kernels.MAX_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled()
                and cache.max_len <= kernels.MAX_CACHE_LEN and kernels.available()):
            return None
        h = self.model.gpt_neox.embed_in(x)  # [N, 1, C]
        stack = self._stack_plan(h.dtype)
        if (stack is None or cache.k[0].dtype != h.dtype
                or not all(t.is_contiguous() for t in cache.k) or not all(t.is_contiguous() for t in cache.v)):
            return None
        return stack.run(h.view(N, -1), cache.k, cache.v, pos, rows)  # [N, C]

    def _stack_plan(self, dtype: torch.dtype):
        layers = self.model.gpt_neox.layers
        plans = [self._block_plan(b, dtype) for b in layers]
        key = tuple(map(id, plans))
        if self._stack is not None and self._stack[0] == key:
            return self._stack[1]
        stack = kernels.StackPlan(plans) if kernels.StackPlan.compatible(plans) and plans[0].dtype == dtype else None
        self._stack = (key, stack, plans)  # plans: keeps the ids in the key unique
        return stack

    def _block_plan(self, block: Block, dtype: torch.dtype):
        mods = block._modules
        attn, mlp = mods["attention"]._modules, mods["mlp"]._modules
        linears = (attn["query_key_value"], attn["dense"], mlp["dense_h_to_4h"], mlp["dense_4h_to_h"])
        norms = (mods["input_layernorm"], mods["post_attention_layernorm"])
        tensors = [tensor_of(m, n) for m in linears for n in ("weight", "bias", "scale32")]
        tensors += [tensor_of(n, p) for n in norms for p in ("weight", "bias")]
        key = tuple((id(t), t.data_ptr(), t.dtype) if t is not None else None for t in tensors)
        cached = self._plans.get(id(block))
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = None
        activation = _fused_activation(mlp["act"])
        specs = [kernel_linear(m) for m in linears]
        if (activation is not None and all(s is not None and s[0].is_contiguous() and s[0].dim() == 2
                                           and s[0].shape[0] >= 4 and s[0].device.type == "cpu" for s in specs)
                and all(tensor_of(n, "weight").dtype == dtype and tensor_of(n, "bias") is not None for n in norms)
                and block.attention.head_size <= 512):
            plan = kernels.BlockPlan([tensor_of(n, p) for n in norms for p in ("weight", "bias")], norms[0].eps, specs,
                                     activation, block.parallel_residual, self.rope.cos, self.rope.sin,
                                     block.attention.n_head, linears[2].out_features)
        self._plans[id(block)] = (key, plan, tensors)  # tensors: keeps the ids in the key unique
        return plan
