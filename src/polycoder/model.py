"""The GPT-NeoX decoder that PolyCoder uses, in plain PyTorch.

Parameter names are exactly those of `transformers.GPTNeoXForCausalLM`
(`gpt_neox.layers.0.attention.query_key_value.weight`, `embed_out.weight`, ...), so a
Hugging Face folder loads with no renaming and `peft` adapters apply to either model.

One attention path (`scaled_dot_product_attention`) and one KV cache: `KVCache` is
preallocated as [rows, heads, max_len, head_size] a layer and written by position. Every
row of a batch carries its own positions, so rows of different lengths, n samples copied
from one prefill, and requests that join a running batch (continuous batching) all use
the same code. Without a cache the model runs the causal training path.

References: GPT-NeoX (Black et al., 2022, arXiv:2204.06745); rotary embeddings (Su et al.,
2021) in GPT-NeoX's "rotate half" layout; transformers' modeling_gpt_neox.py for the
exact layout of the fused QKV weight (interleaved per head: q, k, v of head 0, then head 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from polycoder.config import ModelConfig
from polycoder.ops import Ops


def activation(name: str):
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    return nn.SiLU()


class KVCache(nn.Module):
    """Keys and values of every layer, preallocated, written by position.

    `k[layer]` has shape [rows, heads, max_len, head_size]. A forward pass over rows
    0..B-1 writes its keys at the positions it is given and attends to positions
    0..kv_len-1 of the same rows, masked causally by position, so stale entries beyond a
    row's current position are never read: a row is reused by writing over it, and nothing
    resets the cache behind the caller's back. Rows are rearranged explicitly (`copy_rows`)
    when a batch changes.
    """

    def __init__(self, config: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        if max_len > config.block_size:
            raise ValueError(f"cache length {max_len} exceeds the model's context {config.block_size}")
        shape = (rows, config.n_head, max_len, config.head_size)
        self.rows, self.max_len = rows, max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]

    def copy_rows(self, src: list[int] | torch.Tensor, dst: list[int] | torch.Tensor, length: int) -> None:
        """Positions 0..length-1 of row src[i] copied to row dst[i], in every layer.

        All sources are read before any destination is written, so rows may be permuted.
        """
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]

    def repeat_row(self, row: int, copies: int, length: int) -> None:
        """Positions 0..length-1 of `row` copied into the next copies - 1 rows (a broadcast, no gather):
        a prompt prefilled once for all its samples."""
        for t in self.k + self.v:
            t[row + 1 : row + copies, :, :length] = t[row : row + 1, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_token(self) -> int:
        """Bytes of keys and values one position takes in every layer."""
        _, H, _, hs = self.k[0].shape
        return 2 * len(self.k) * H * hs * self.k[0].element_size()


class CacheRows:
    """A view of rows [start, stop) of a KV cache (shares its storage): a forward pass with it
    writes and reads those rows as its rows 0..stop-start-1."""

    def __init__(self, cache: KVCache, start: int, stop: int):
        self.k = [t[start:stop] for t in cache.k]
        self.v = [t[start:stop] for t in cache.v]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for GPT-NeoX rotary embeddings, indexed by absolute position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.rotary_dims
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(config.block_size, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [block_size, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [block_size, dim]: the "rotate half" layout
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, pos: torch.Tensor | None, T: int, dtype: torch.dtype):
        if pos is None:  # training path: positions 0..T-1 for every row, q and k as [B, T, H, 2, hs]
            return self.cos[:T].to(dtype)[:, None, None], self.sin[:T].to(dtype)[:, None, None]  # [T, 1, 1, dim]
        return self.cos[pos].to(dtype)[:, None], self.sin[pos].to(dtype)[:, None]  # [B, 1, T, dim]


def causal_mask(pos: torch.Tensor, kv_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, T, S] additive mask: the query at position p sees cache positions 0..p of its row.

    Additive (0 / -inf in the activations' dtype) rather than boolean: SDPA's CPU kernels
    convert a boolean mask to this form in every layer otherwise.
    """
    visible = torch.arange(kv_len, device=pos.device)[None, None, :] <= pos[:, :, None]  # [B, T, S]
    return torch.zeros(visible.shape, dtype=dtype, device=pos.device).masked_fill_(~visible, float("-inf"))[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.size(-1)` dims of x [B, H, T, hs]; the rest pass through."""
    d = cos.size(-1)
    xr, xp = x[..., :d], x[..., d:]
    x1, x2 = xr[..., : d // 2], xr[..., d // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    if xp.size(-1) == 0:  # the whole head rotates (PolyCoder): no second concatenation
        return xr * cos + rotated * sin
    return torch.cat((xr * cos + rotated * sin, xp), dim=-1)


def split_qkv_rotary(qkv: torch.Tensor, n_head: int, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v [B, H, T, hs] (views) from the fused projection [B, T, 3C], q and k rotated
    together in one set of element-wise operations; cos/sin [T, 1, 1, rotary_dims]."""
    B, T, C3 = qkv.shape
    qkv = qkv.view(B, T, n_head, 3, C3 // (3 * n_head))  # the interleaved weight: q, k, v per head
    qk, v = qkv.split((2, 1), dim=3)  # [B, T, H, 2, hs], [B, T, H, 1, hs]
    qk = apply_rotary(qk, cos, sin)  # [B, T, H, 2, hs]
    q, k = qk[:, :, :, 0].transpose(1, 2), qk[:, :, :, 1].transpose(1, 2)  # [B, H, T, hs]
    return q, k, v[:, :, :, 0].transpose(1, 2)


class TorchOps:
    """The model's own operations (`polycoder.ops.Ops`), plain PyTorch: what runs unless a
    backend gives others (`polycoder.backend.choose`)."""

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    def qkv_rotary(self, qkv: torch.Tensor, n_head: int, cos: torch.Tensor, sin: torch.Tensor):
        return split_qkv_rotary(qkv, n_head, cos, sin)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def head_loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(F.linear(h, weight), targets)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] against targets [N], -100 ignored, computed in fp32
    (bf16 logits lose about three digits of the loss otherwise)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


TORCH_OPS = TorchOps()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attention_bias)
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=config.attention_bias)

    def forward(self, x, cos, sin, ops: Ops = TORCH_OPS, pos=None, cache: KVCache | None = None, layer: int = 0,
                kv_len: int = 0, mask=None):
        B, T, C = x.shape
        if cache is None:  # training, or a forward over whole sequences: positions 0..T-1, causal
            q, k, v = ops.qkv_rotary(ops.linear(self.query_key_value, x), self.n_head, cos, sin)  # each [B, H, T, hs]
            y = ops.causal_attention(q, k, v)  # [B, H, T, hs]
            return ops.linear(self.dense, y.transpose(1, 2).reshape(B, T, C))
        qkv = ops.linear(self.query_key_value, x)  # [B, T, 3C]
        # Fused weight is interleaved per head: [q_h0 k_h0 v_h0 q_h1 ...].
        qkv = qkv.view(B, T, self.n_head, 3 * self.head_size).transpose(1, 2)  # [B, H, T, 3hs]
        q, k, v = qkv.split(self.head_size, dim=-1)  # each [B, H, T, hs]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        index = pos[:, None, :, None].expand(B, self.n_head, T, self.head_size)  # [B, H, T, hs]
        cache.k[layer][:B].scatter_(2, index, k)
        cache.v[layer][:B].scatter_(2, index, v)
        keys, values = cache.k[layer][:B, :, :kv_len], cache.v[layer][:B, :, :kv_len]  # [B, H, S, hs]
        if mask is None:
            mask = causal_mask(pos, kv_len, q.dtype)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, H, T, hs] -> [B, T, C]
        return ops.linear(self.dense, y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.n_embd, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.n_embd)

    def forward(self, x, ops: Ops = TORCH_OPS):
        return ops.linear(self.dense_4h_to_h, self.act(ops.linear(self.dense_h_to_4h, x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ops: Ops = TORCH_OPS, pos=None, cache=None, layer=0, kv_len=0, mask=None):
        a = self.attention(self.input_layernorm(x), cos, sin, ops, pos, cache, layer, kv_len, mask)
        if self.parallel_residual:
            #  x ──┬── ln1 ── attn ──┐
            #      ├── ln2 ── mlp ───┤
            #      └─────────────────+──> out       (GPT-J, Pythia)
            return x + a + self.mlp(self.post_attention_layernorm(x), ops)
        #  x ── ln1 ── attn ──+── ln2 ── mlp ──+──> out   (PolyCoder)
        #  └──────────────────┘└───────────────┘
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), ops)


class GPTNeoXModel(nn.Module):
    """The transformer trunk, named `gpt_neox` in the checkpoint."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_layer_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class GPTNeoX(nn.Module):
    """GPT-NeoX causal language model with transformers' parameter names.

    `ops` runs the products, attention and loss (`polycoder.ops`): plain PyTorch unless a
    backend sets faster ones (the trainer does, through `polycoder.backend.choose`) or a
    caller passes its own for one call (the engine's prefill does). Fast decode steps are
    objects of their own (`polycoder.backend`) that read this model.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.ops: Ops = TORCH_OPS
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        select: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        ops: Ops | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, T], or with `targets` the training loss.

        Without `cache`: the causal training path, positions 0..T-1, logits [B, T, V].
        With `cache`: `pos` [B, T] gives each token's position in its row; keys and values
        are written there and attention reads positions 0..kv_len-1 (default: max(pos)+1).
        `select` [B] picks one position a row, so only those logits are computed ([B, 1, V]).
        `targets` [B, T] (next tokens, -100 ignored; without a cache): returns the mean
        cross-entropy, a scalar, from `ops.head_loss` (a backend may fuse the output head
        and the loss so that the [B*T, V] logits are never kept).
        `ops`: the operations of this call (default: `self.ops`).
        """
        ops = ops if ops is not None else self.ops
        B, T = input_ids.shape
        if cache is not None:
            if pos is None:
                raise ValueError("a forward pass with a KV cache needs positions")
            if kv_len is None:
                kv_len = int(pos.max()) + 1
        x = self.gpt_neox.embed_in(input_ids)  # [B, T, C]
        cos, sin = self.gpt_neox.rotary_emb(pos, T, x.dtype)
        mask = causal_mask(pos, kv_len, x.dtype) if cache is not None else None  # built once, shared by all layers
        for i, block in enumerate(self.gpt_neox.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, ops, use_reentrant=False)
            else:
                x = block(x, cos, sin, ops, pos, cache, i, kv_len or 0, mask)
        if select is not None:
            x = x[torch.arange(B, device=x.device), select][:, None]  # [B, 1, C]
        x = self.gpt_neox.final_layer_norm(x)
        if targets is not None and cache is None and type(self.embed_out) is nn.Linear:
            return ops.head_loss(x.flatten(0, 1), self.embed_out.weight, targets.flatten())
        logits = ops.linear(self.embed_out, x)
        if targets is not None:  # a wrapped head (e.g. a LoRA adapter on it): the plain way
            return cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit LayerNorms (as transformers)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        p = self.gpt_neox.embed_in.weight  # the model's dtype even when linear weights are quantized
        return KVCache(self.config, rows, max_len, dtype=p.dtype, device=p.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
