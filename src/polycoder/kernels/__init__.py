"""Native CPU kernels for decoding and training, compiled on first use with the host's C compiler.

`linear(x, weight, bias, scale)` is a weight-streaming product for a few activation rows
(a decode step): fp32, bf16 or int8 weights (int8 with one scale an output row), fp32 or
bf16 activations and output, GELU optionally fused; `BlockPlan(...).run` is a whole
GPT-NeoX block of a decode step (LayerNorms, products, rotary, cache write, attention, MLP,
residuals) in one call, which removes PyTorch's per-operation overhead (decode.c and
decode_block.c say how),
and `StackPlan` runs all blocks in one call. The decode step that uses them is
`polycoder.backend.native_decode`; training's users are `polycoder.backend.attention` and
`polycoder.backend.fused_loss`. PyTorch's own kernels serve everything else: more rows than
`MAX_ROWS`, gradients, other devices and dtypes, and machines where the kernels cannot be
built.

Sources: decode.c (the decode products), decode_block.c (a block's decode step on them:
attention over the cache), train.c (the training kernels: cross-entropy,
attention backward, rotary split, transpose), common.h (helpers they share) and kernels.h,
which declares every exported function; `SIGNATURES` below is its ctypes mirror
(tests/test_kernels_header.py checks the two agree).

Variants: the kernels are written once against a small vector layer (common.h) that the
compiler's target picks: AVX-512 (F and BW; VNNI, BF16 and AMX used where present),
AVX2 + FMA (x86-64-v3: AMD before Zen 4, Intel client CPUs, many cloud VMs) or ARM64 NEON
(Apple Silicon, Graviton, Ampere; int8 products by `sdot` where the CPU has the dot product
extension). `variant()` names the one in use. The AVX2 and NEON variants run every decode
kernel and the training kernels but the bf16 attention backward (it needs AVX512-BF16;
training keeps PyTorch's there).

Build: `cc -O3 -march=native -fopenmp -shared -fPIC decode.c decode_block.c train.c -lm` (`-mcpu=native` on
ARM64; plus `tuning()`'s defines, choices measured on one CPU family) into one library in
`$POLYCODER_CACHE/kernels/<hash>/` (default ~/.cache/polycoder), keyed by every source and
header, the compiler, its flags and the CPU's flags, written to a temporary name and renamed
(a half-written library is never loaded); a few seconds, once a machine. `-march=native` is
right here because the library is built where it runs. `POLYCODER_KERNELS_ISA=avx2` builds
for `-march=x86-64-v3` instead (where the CPU has AVX2 and FMA), so that a developer on an
AVX-512 machine can run and test the AVX2 variant; `native` (the default) is the other
value. The OpenMP runtime it links is the `libgomp.so.1` PyTorch has already loaded, so
both share one pool of threads.

`POLYCODER_KERNELS=0` turns the kernels off (PyTorch's products everywhere: the benchmark
uses it to compare). Without a compiler or without AVX2 + FMA the kernels are unavailable
and `status()` says why; nothing else changes.

Limits: x86-64 (AVX-512 or AVX2 + FMA) and ARM64 (NEON). The NEON variant is checked for
correctness only, under emulation (qemu-aarch64 runs tests/kernels_check.c against a scalar
fp64 reference: tests/test_kernels_arm64.py); its speed is unmeasured until an ARM machine
runs benchmarks/decode.py. On macOS, Apple's clang has no OpenMP without libomp, so the
build fails there and PyTorch serves every step. At most `MAX_ROWS` rows a call, beyond
which PyTorch's blocked matrix products are the better tool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from polycoder import cpu
from polycoder.errors import PolycoderError
from polycoder.files import atomic_path, cache_root

log = logging.getLogger(__name__)

MAX_ROWS = 8
MAX_CACHE_LEN = 32768  # cache positions a decode step can attend to (decode_block.c's scores buffer)
FOLDER = Path(__file__).parent
SOURCES = (FOLDER / "decode.c", FOLDER / "decode_block.c", FOLDER / "train.c")  # compiled together into one library
HEADER = FOLDER / "kernels.h"  # declares every exported function: SIGNATURES mirrors it

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
# name -> (restype, argtypes) of every function kernels.h declares, in its order: pointers
# are c_void_p, int c_int, long c_long, float c_float.
SIGNATURES = {
    "pc_available": (_I, []),
    "pc_linear": (_I, [_P, _I, _P, _I, _P, _P, _I, _P, _I, _I, _L, _L, _L, _I]),
    "pc_block": (_I, [_P, _I, _L, _L, _L, _P, _F, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _I]),
    "pc_blocks": (_I, [_P, _I, _L, _L, _L, _L, _P, _F, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _I]),
    "pc_cross_entropy_bf16": (_I, [_P, _L, _L, _P, _P, _P, _P, _I, _I]),
    "pc_attention_grad_bf16": (_I, [_P] * 8 + [_L] * 5 + [_P, _F, _P, _P, _I, _I]),
    "pc_rotary_qkv": (_I, [_P, _I, _P, _P, _P, _I, _P, _P, _L, _L, _L, _L, _L, _I, _I]),
    "pc_transpose_bf16_f32": (_I, [_P, _P, _L, _L, _I]),
}
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
# pc_available()'s codes (common.h's PC_ISA) -> the variant's name.
VARIANTS = {1: "AVX-512", 2: "AVX2+FMA", 3: "NEON"}
# POLYCODER_KERNELS_ISA -> (the compiler's -march, the CPU flags it needs: x86-64-v3's).
ISAS = {"native": ("native", ()),
        "avx2": ("x86-64-v3", ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"))}

_lock = threading.Lock()
_lib = None  # ctypes function, False once a build has failed
_why = "not built yet"
_variant: str | None = None


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    return cpu.flags()


def tuning() -> list[str]:
    """The compiler defines chosen by measurements on one CPU family (decode.c's pf_rows): the
    weights prefetched at every activation row count on Intel CPUs, from 3 rows elsewhere."""
    return ["-DPC_PREFETCH_FROM_ROWS=1"] if cpu.vendor() == "GenuineIntel" else []


def compile_flags(march: str) -> list[str]:
    """The compiler's flags for a library of the kernels built for `march` ("native" or an x86
    level such as x86-64-v3), this CPU's tuning defines included."""
    # ARM64 (Graviton, Ampere, Apple Silicon): -mcpu=native, which GCC and Clang accept there
    # (Apple's clang too) and which also tunes for the core; NEON is in the base ISA and
    # the dot product instructions come with the CPU's own features.
    arm64 = platform.machine().lower() in ("aarch64", "arm64") and march == "native"
    return ["-O3", "-mcpu=native" if arm64 else f"-march={march}", "-fopenmp", "-shared", "-fPIC", *tuning()]


def _isa() -> str:
    """POLYCODER_KERNELS_ISA's value: which variant to build (see the module)."""
    isa = os.environ.get("POLYCODER_KERNELS_ISA", "native").strip().lower() or "native"
    if isa not in ISAS:
        raise PolycoderError(f"POLYCODER_KERNELS_ISA={isa!r} is not one of {', '.join(ISAS)}; "
                             "unset it (native) or set it to avx2")
    return isa


def _build() -> Path:
    march, needs = ISAS[_isa()]
    missing = [f for f in needs if f not in _cpu_flags().split()]
    if missing:
        raise OSError(f"POLYCODER_KERNELS_ISA={_isa()} needs CPU features this CPU does not list: {' '.join(missing)}")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler (cc/gcc/clang) on PATH; install one (e.g. apt-get install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = compile_flags(march)
    libs = ["-lm"]
    files = sorted([*FOLDER.glob("*.c"), *FOLDER.glob("*.h")])  # every source and header, by name
    texts = [f"{f.name}\n{f.read_text()}" for f in files]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(flags), _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / key / "libpolycoder_kernels.so"
    if target.is_file():
        return target
    with atomic_path(target) as tmp:
        r = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(tmp), *libs], capture_output=True, text=True,
                           timeout=300)
        if r.returncode:
            raise OSError(f"{cc} failed: {r.stderr.strip()[-500:]}")
    return target


def _load():
    global _lib, _why, _variant
    if _lib is not None:
        return _lib or None
    with _lock:
        if _lib is not None:
            return _lib or None
        if os.environ.get("POLYCODER_KERNELS", "1") == "0":
            _lib, _why = False, "turned off by POLYCODER_KERNELS=0"
            return None
        isa = _isa()  # a misspelled value is the user's error, not a reason to fall back quietly
        try:
            torch.set_num_threads(torch.get_num_threads())  # make sure PyTorch's libgomp is loaded first
            dll = ctypes.CDLL(str(_build()))
            for name, (restype, argtypes) in SIGNATURES.items():
                fn = getattr(dll, name)
                fn.restype, fn.argtypes = restype, argtypes
            code = dll.pc_available()
            if code not in VARIANTS:
                _lib, _why = False, "this CPU has none of AVX-512, AVX2 + FMA or ARM64 NEON (the kernels' paths so far)"
                return None
            _variant = VARIANTS[code]
            chosen = "" if isa == "native" else f", POLYCODER_KERNELS_ISA={isa}"
            _lib, _why = dll, f"available ({_variant}{chosen})"
        except (OSError, subprocess.SubprocessError) as e:
            _lib, _why = False, f"could not build or load them: {e}"
            log.info("polycoder native kernels off (%s); using PyTorch's products", _why)
        return _lib or None


def available() -> bool:
    return _load() is not None


def status() -> str:
    """Whether the kernels are in use and which variant ("available (AVX2+FMA)"), or why not."""
    _load()
    return _why


def variant() -> str | None:
    """The variant in use ("AVX-512", "AVX2+FMA" or "NEON"), None where the kernels are unavailable."""
    _load()
    return _variant


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes this call (else use PyTorch)."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype in _KINDS
        and weight.dim() == 2 and weight.shape[0] >= 1
        and x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and weight.is_contiguous()
        and available()
    )


ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           activation: str | None = None) -> torch.Tensor:
    """activation(x @ weight.T * scale + bias) for a few rows; only where `usable(x, weight)`.

    weight [N, K] contiguous fp32/bf16/int8; scale [N] fp32 (int8 weights need it); bias [N]
    fp32 or bf16; activation None, "gelu" (erf) or "gelu_tanh", applied before the result
    is rounded to `out_dtype` (default x's dtype); the result has x's leading shape.
    """
    fn = _load().pc_linear
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    out_dtype = out_dtype or x.dtype
    if bias is not None and bias.dtype not in (torch.float32, torch.bfloat16):
        bias = bias.float()
    if scale is not None and scale.dtype != torch.float32:
        raise ValueError("scale must be fp32")
    y = torch.empty(M, N, dtype=out_dtype)
    rc = fn(x2.data_ptr(), int(x2.dtype == torch.bfloat16), weight.data_ptr(), _KINDS[weight.dtype],
            scale.data_ptr() if scale is not None else None,
            bias.data_ptr() if bias is not None else None, int(bias is not None and bias.dtype == torch.bfloat16),
            y.data_ptr(), int(out_dtype == torch.bfloat16), ACTIVATIONS[activation], M, N, K, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"polycoder kernel pc_linear failed with code {rc}")
    return y.view(*x.shape[:-1], N)


def cross_entropy_bf16_(logits: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor,
                        grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp [R], target logit [R]) of bf16 logits [R, V], both fp32; with `grad`,
    the logits are overwritten by row_weights[r] * (softmax - onehot(target)) in bf16.

    targets [R] int64 in [0, V) (ignored rows: any valid id and weight 0); row_weights [R]
    fp32. Only on the CPU with the kernels available (`available()`); contiguous logits.
    """
    R, V = logits.shape
    if logits.dtype != torch.bfloat16 or not logits.is_contiguous() or logits.device.type != "cpu":
        raise ValueError("cross_entropy_bf16_ takes contiguous bf16 CPU logits")
    targets = targets.to(torch.int64).contiguous()
    row_weights = row_weights.to(torch.float32).contiguous()
    lse, picked = torch.empty(R, dtype=torch.float32), torch.empty(R, dtype=torch.float32)
    rc = _load().pc_cross_entropy_bf16(logits.data_ptr(), R, V, targets.data_ptr(), row_weights.data_ptr(),
                                       lse.data_ptr(), picked.data_ptr(), int(grad), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"polycoder kernel pc_cross_entropy_bf16 failed with code {rc}")
    return lse, picked


def attention_grad_bf16_(q: torch.Tensor, dout: torch.Tensor, out: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         lse: torch.Tensor, scale: float, p: torch.Tensor, ds: torch.Tensor,
                         work: torch.Tensor) -> None:
    """A causal attention's probabilities p = exp(scale q.k - lse) and score gradients
    ds = scale p (dO.v - rowsum(dO O)), bf16 [n, T, T], zero above the diagonal; the
    products accumulate in fp32 inside the kernel (train.c says how). q, dout [n, Tp, Dp]
    bf16 (T and D rounded up to 32, zero padded); out, k, v [n, T, D] bf16; lse (of the
    forward, of scale q.k) [n, T] fp32; work: an fp32 buffer of `attention_work(n, T, D)`
    elements. Needs `has_attention_grad_bf16()`. The products run on AMX tiles where the CPU
    has them, else on vdpbf16ps; POLYCODER_AMX=0 forces the latter (tests compare the two)."""
    n, T, D = k.shape
    Tp, Dp = round_up32(T), round_up32(D)
    tensors = (q, dout, out, k, v, lse, p, ds, work)
    ok = (all(t.is_contiguous() and t.device.type == "cpu" for t in tensors) and D % 2 == 0
          and all(t.dtype == torch.bfloat16 for t in (q, dout, out, k, v, p, ds))
          and lse.dtype == work.dtype == torch.float32 and q.shape == dout.shape == (n, Tp, Dp)
          and out.shape == v.shape == k.shape and lse.shape == (n, T) and p.shape == ds.shape == (n, T, T)
          and work.numel() >= attention_work(n, T, D))
    if not ok:
        raise ValueError("attention_grad_bf16_ got tensors of the wrong shape, dtype or layout (see its docstring)")
    pairs = n * Dp // 2 * Tp  # 32-bit pairs of bf16 in each of kp and vp
    kp, vp, dsum = work[:pairs], work[pairs:2 * pairs], work[2 * pairs:2 * pairs + n * T]
    rc = _load().pc_attention_grad_bf16(*(t.data_ptr() for t in (q, dout, out, k, v, kp, vp, dsum)), n, T, Tp, D, Dp,
                                        lse.data_ptr(), scale, p.data_ptr(), ds.data_ptr(),
                                        int(os.environ.get("POLYCODER_AMX", "1") != "0"), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"polycoder kernel pc_attention_grad_bf16 failed with code {rc}")


def rotary_qkv_(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, grad: bool) -> None:
    """x [B, T, H, 3, hs] <-> q, k, v [B, H, T, hs]: forward (grad False) writes q, k, v,
    q and k rotated over the first rot dims by cos/sin [T, rot] (fp32, "rotate half");
    grad True writes x from the gradients in q, k, v (the transposed rotation). x and the
    outputs fp32 or bf16 (each its own); everything contiguous on the CPU."""
    B, T, H, three, hs = x.shape
    rot = cos.shape[-1]
    ok = (three == 3 and q.shape == k.shape == v.shape == (B, H, T, hs) and cos.shape == sin.shape == (T, rot)
          and rot % 2 == 0 and rot <= hs and cos.dtype == sin.dtype == torch.float32
          and x.dtype in _FLOATS and q.dtype == k.dtype == v.dtype and q.dtype in _FLOATS
          and all(t.is_contiguous() and t.device.type == "cpu" for t in (x, q, k, v, cos, sin)))
    if not ok:
        raise ValueError("rotary_qkv_ got tensors of the wrong shape, dtype or layout (see its docstring)")
    rc = _load().pc_rotary_qkv(x.data_ptr(), int(x.dtype == torch.bfloat16), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                               int(q.dtype == torch.bfloat16), cos.data_ptr(), sin.data_ptr(), B, T, H, hs, rot,
                               int(grad), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"polycoder kernel pc_rotary_qkv failed with code {rc}")


_FLOATS = (torch.float32, torch.bfloat16)


def transpose_bf16_to_f32(src: torch.Tensor) -> torch.Tensor:
    """src.t().float().contiguous() for a contiguous bf16 CPU matrix [C, V], in one pass."""
    if src.dim() != 2 or src.dtype != torch.bfloat16 or not src.is_contiguous() or src.device.type != "cpu":
        raise ValueError("transpose_bf16_to_f32 takes a contiguous bf16 CPU matrix")
    C, V = src.shape
    dst = torch.empty(V, C, dtype=torch.float32)
    rc = _load().pc_transpose_bf16_f32(src.data_ptr(), dst.data_ptr(), C, V, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"polycoder kernel pc_transpose_bf16_f32 failed with code {rc}")
    return dst


def round_up32(x: int) -> int:
    """x rounded up to a multiple of 32: the padded length and head size of `attention_grad_bf16_`."""
    return (x + 31) // 32 * 32


def attention_work(n: int, T: int, D: int) -> int:
    """fp32 elements of the work buffer of `attention_grad_bf16_`: k and v in pairs, and
    the row sums."""
    return n * round_up32(D) * round_up32(T) + n * T


_attention_grad_runs: bool | None = None


def has_attention_grad_bf16() -> bool:
    """Whether `attention_grad_bf16_` runs here (the kernels built, and AVX512-BF16); asked
    of the library once (an empty call: -4 where the CPU lacks AVX512-BF16)."""
    global _attention_grad_runs
    if _attention_grad_runs is None:
        lib = _load()
        _attention_grad_runs = lib is not None and lib.pc_attention_grad_bf16(
            *[None] * 8, 0, 0, 0, 0, 0, None, 1.0, None, None, 1, 1) == 0
    return _attention_grad_runs


def _cache_rows(cache_rows: torch.Tensor | None, B: int, rows: int) -> torch.Tensor | None:
    """The int64 cache row of each of B rows (None: row b is cache row b), checked to lie in the cache."""
    if cache_rows is None:
        if B > rows:
            raise ValueError(f"{B} rows for a cache of {rows}")
        return None
    crow = cache_rows.to(torch.int64).contiguous()
    if crow.numel() != B or (B and not 0 <= int(crow.min()) <= int(crow.max()) < rows):
        raise ValueError(f"cache rows {crow.tolist()} do not name rows of a cache of {rows}")
    return crow


class BlockPlan:
    """The constant arguments of one GPT-NeoX block's native decode step, prepared once.

    ln: ln1 weight, ln1 bias, ln2 weight, ln2 bias (the stream's dtype); linears: (weight,
    fp32 scale or None, bias or None) for query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h; cos/sin fp32 tables [context, rotary dims]. The plan holds references
    to these tensors (their pointers are baked in): build a new plan when they change.
    """

    def __init__(self, ln: list[torch.Tensor], eps: float, linears: list[tuple], activation: str | None,
                 parallel_residual: bool, cos: torch.Tensor, sin: torch.Tensor, n_head: int, intermediate: int):
        if cos.dtype != torch.float32 or sin.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("a block plan needs contiguous fp32 cos/sin tables")
        ptrs, kinds = [], []
        for weight, scale, bias in linears:
            if scale is not None and scale.dtype != torch.float32:
                raise ValueError("int8 scales must be fp32")
            ptrs += [weight.data_ptr(), scale.data_ptr() if scale is not None else None,
                     bias.data_ptr() if bias is not None else None]
            kinds.append(_KINDS[weight.dtype])
        self.tensors = [*ln, cos, sin, *(t for lin in linears for t in lin if t is not None)]  # kept alive
        self.lin = (ctypes.c_void_p * 12)(*ptrs)
        self.lns = (ctypes.c_void_p * 4)(*[t.data_ptr() for t in ln])
        self.kinds = (ctypes.c_int * 4)(*kinds)
        self.eps, self.act, self.parallel = float(eps), ACTIVATIONS[activation], int(parallel_residual)
        self.cos, self.sin, self.rot = cos.data_ptr(), sin.data_ptr(), cos.shape[-1]
        self.n_head, self.intermediate, self.dtype = n_head, intermediate, ln[0].dtype

    def run(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
            cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C] (the plan's dtype) -> the block's output [B, C]; writes k, v at pos [B].

        Caches [rows, H, max_len, hs] contiguous in the plan's dtype; row b uses cache row
        cache_rows[b] (default b: rows that share one are positions of one sequence, see
        kernels.h); every row's position must lie inside the cache and the cos/sin tables.
        """
        B, C = x.shape
        _, H, max_len, hs = k_cache.shape
        y = x.clone(memory_format=torch.contiguous_format)
        pos = pos.to(torch.int64).contiguous()
        crow = _cache_rows(cache_rows, B, k_cache.size(0))
        rc = _load().pc_block(y.data_ptr(), int(x.dtype == torch.bfloat16), B, C, self.intermediate, self.lns, self.eps,
                              self.lin, self.kinds, self.act, self.parallel, k_cache.data_ptr(), v_cache.data_ptr(),
                              self.cos, self.sin, pos.data_ptr(), crow.data_ptr() if crow is not None else None,
                              H, hs, self.rot, max_len, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"polycoder kernel pc_block failed with code {rc} (a position outside the cache?)")
        return y


class StackPlan:
    """Consecutive blocks' decode steps in one native call (`pc_blocks`), from their plans.

    The blocks must agree on everything but their weights (dtype, LayerNorm eps, activation,
    residual form, rotary tables, heads, MLP width), as a model's blocks do; `compatible`
    says whether they do. Holds the plans (and so their tensors) alive.
    """

    def __init__(self, plans: list[BlockPlan]):
        if not self.compatible(plans):
            raise ValueError("these block plans differ in more than their weights")
        first = plans[0]
        self.plans, self.L = plans, len(plans)
        self.lns = (ctypes.c_void_p * (4 * self.L))(*[p for plan in plans for p in plan.lns])
        self.lin = (ctypes.c_void_p * (12 * self.L))(*[p for plan in plans for p in plan.lin])
        self.kinds = (ctypes.c_int * (4 * self.L))(*[k for plan in plans for k in plan.kinds])
        self.eps, self.act, self.parallel, self.dtype = first.eps, first.act, first.parallel, first.dtype
        self.cos, self.sin, self.rot = first.cos, first.sin, first.rot
        self.n_head, self.intermediate = first.n_head, first.intermediate

    @staticmethod
    def compatible(plans: list) -> bool:
        if not plans or any(p is None for p in plans):
            return False
        f = plans[0]
        same = lambda p: (p.eps, p.act, p.parallel, p.dtype, p.cos, p.sin, p.rot, p.n_head, p.intermediate)  # noqa: E731
        return all(same(p) == same(f) for p in plans)

    def run(self, x: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], pos: torch.Tensor,
            cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C] -> the last block's output [B, C]; caches and cache_rows as in `BlockPlan.run`, one a block."""
        B, C = x.shape
        _, H, max_len, hs = k_caches[0].shape
        y = x.clone(memory_format=torch.contiguous_format)
        pos = pos.to(torch.int64).contiguous()
        crow = _cache_rows(cache_rows, B, k_caches[0].size(0))
        kc = (ctypes.c_void_p * self.L)(*[t.data_ptr() for t in k_caches])
        vc = (ctypes.c_void_p * self.L)(*[t.data_ptr() for t in v_caches])
        rc = _load().pc_blocks(y.data_ptr(), int(x.dtype == torch.bfloat16), B, C, self.intermediate, self.L, self.lns,
                               self.eps, self.lin, self.kinds, self.act, self.parallel, kc, vc, self.cos, self.sin,
                               pos.data_ptr(), crow.data_ptr() if crow is not None else None, H, hs, self.rot, max_len,
                               torch.get_num_threads())
        if rc:
            raise RuntimeError(f"polycoder kernel pc_blocks failed with code {rc} (a position outside the cache?)")
        return y
