"""The custom ops `awq::int4_linear`, `awq::int4_linear_multi`, `awq::int4_linear_glu`,
`awq::int4_linear_partials` and `awq::int4_linear_rope_cache` (torch.library): schema, reference
impl, fake impl.

    y = x @ dequantize(qweight, scales, zeros)[:, :K].T + bias,   K = x.shape[-1]
    ys = [int4_linear(x, qweights[i], scales[i], zeros[i], group_size, biases[i]) for i]
    h = silu(gate) * up,   gate, up = int4_linear_multi(x, [Wg, Wu], ...)

with the NK_U8 layout of awq_compile.quant (docs/format.md). The reference implementation
dequantizes per call and runs on any device; `awq_compile._cuda` registers the CUDA kernels over
it when the compiled extension is available. `int4_linear_multi` is the horizontal fusion of
up to `MAX_SEGMENTS` linears reading one activation (q/k/v, gate/up), the op the pass
`fuse_sibling_linears` puts in their place: one launch instead of several. `int4_linear_glu` is
a gated MLP's gate and up projections with their activation (SwiGLU: Llama, Mistral, Qwen), the
op the pass `fuse_gated_mlp` puts in place of `silu(gate(x)) * up(x)`: the CUDA decode kernel
computes both projections in one launch and writes only the product. Its reference makes the
product in x's dtype, as the unfused graph does eagerly; the CUDA kernels make it in fp32 from
the two rounded outputs and round once, as inductor's fused elementwise kernel does.

    p = int4_linear_partials(x, W, S, Z, g, slices)    # float32 [slices, *x.shape[:-1], N]
    y = (p.sum(0) + bias).to(x.dtype)                  # = int4_linear(x, W, S, Z, g, bias)

`int4_linear_partials` is the product's K-slice partial sums, left for the graph to add: the pass
`defer_split_k` puts it (and the sum) where the CUDA decode kernel would split K and sum the
slices in a second launch, so that inductor adds them inside the kernel that reads y.

    q = int4_linear_rope_cache(x, [Wq, Wk, Wv], S, Z, g, b, cos, sin, positions, k_cache, v_cache)

`int4_linear_rope_cache` is an attention block's q/k/v projections, the rotary embedding of q and
k (Llama's `rotate_half` form) and a static KV cache's writes of k and v (it mutates both
caches), the op the pass `fuse_rope_cache` puts in place of those steps: on CUDA the rotation and
the writes happen in the projection's epilogue or one launch after it, where inductor had three
kernels between q/k/v and attention.

    out, h = int4_linear_glu_norm(residual, delta, delta_bias, norm_weight, eps, [Wg, Wu], ...)
    q, h = int4_linear_rope_cache_norm(residual, delta, delta_bias, norm_weight, eps, [Wq, Wk, Wv], ...)

The `*_norm` ops put a decoder layer's residual add and RMSNorm in front (`add_rms_norm`: h =
residual + delta, x = RMSNorm(h)), the ops the pass `fuse_add_rms_norm` makes of the inductor
kernel before each: the CUDA decode kernel computes x while it stages it and writes h.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .quant import dequantize

__all__ = ["int4_linear", "int4_linear_multi", "int4_linear_glu", "int4_linear_partials", "check_int4_linear_args",
           "check_int4_linear_multi_args", "check_int4_linear_glu_args", "int4_linear_rope_cache",
           "check_int4_linear_rope_cache_args", "rotate_heads", "cache_positions", "MAX_SEGMENTS", "add_rms_norm",
           "check_add_rms_norm_args", "add_rms_norm_op", "int4_linear_glu_norm", "int4_linear_rope_cache_norm",
           "decode_attention", "check_decode_attention_args", "DECODE_ATTENTION_MAX_ROWS", "OP_NAMES"]

OP_NAMES = ("int4_linear", "int4_linear_multi", "int4_linear_glu", "int4_linear_partials", "int4_linear_rope_cache",
            "int4_linear_glu_norm", "int4_linear_rope_cache_norm", "add_rms_norm", "decode_attention")
"""The ops this module defines in the `awq` namespace (the backend gives each inductor's
fallback lowering before inductor meets it)."""

MAX_SEGMENTS = 4
"""Most linears one `int4_linear_multi` call takes: q/k/v and gate/up need 3 and 2."""


def check_int4_linear_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple[int, int]:
    """Validate the op's arguments; returns (N, K). Raises with the actual shapes."""
    def bad(msg: str) -> ValueError:
        return ValueError(
            f"awq::int4_linear: {msg} (x {tuple(x.shape)} {x.dtype}, qweight "
            f"{tuple(qweight.shape)} {qweight.dtype}, scales {tuple(scales.shape)} {scales.dtype}, "
            f"zeros {tuple(zeros.shape)} {zeros.dtype}, group_size {group_size})"
        )

    if qweight.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise bad("qweight and zeros must be uint8")
    if not x.is_floating_point() or not scales.is_floating_point():
        raise bad("x and scales must be floating point")
    if qweight.dim() != 2 or scales.dim() != 2 or zeros.dim() != 2:
        raise bad("qweight, scales and zeros must be 2-D")
    if group_size not in (32, 64, 128):
        raise bad("group_size must be 32, 64 or 128")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    k = x.shape[-1]
    if kp % group_size:
        raise bad("packed K is not a multiple of group_size")
    if not kp - group_size < k <= kp:
        raise bad(f"x has K={k} features but the weight holds K in ({kp - group_size}, {kp}]")
    if tuple(scales.shape) != (n, kp // group_size) or tuple(zeros.shape) != (n, kp // group_size):
        raise bad(f"scales and zeros must be [{n}, {kp // group_size}]")
    if bias is not None and tuple(bias.shape) != (n,):
        raise bad(f"bias must be [{n}], got {tuple(bias.shape)}")
    return n, k


@torch.library.custom_op("awq::int4_linear", mutates_args=())
def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """INT4 weight-only linear; see the module docstring for the formula and layout."""
    _, k = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias)
    # Half precision on the CPU accumulates poorly and slowly: compute in float32 there.
    cdt = torch.float32 if x.device.type == "cpu" else x.dtype
    w = dequantize(qweight, scales, zeros, group_size, k, dtype=cdt)
    b = None if bias is None else bias.to(cdt)
    return F.linear(x.to(cdt), w, b).to(x.dtype)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None):
    n, _ = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], n))


def check_int4_linear_multi_args(
    x: torch.Tensor,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
) -> list[int]:
    """Validate `int4_linear_multi`'s arguments; returns N per segment. Each segment gets
    `check_int4_linear_args`; all must hold the same packed K."""
    lens = (len(qweights), len(scales), len(zeros), len(biases))
    if len(set(lens)) != 1:
        raise ValueError(
            "awq::int4_linear_multi: qweights, scales, zeros and biases must have the same "
            f"length, got {list(lens)}"
        )
    if not 1 <= lens[0] <= MAX_SEGMENTS:
        raise ValueError(
            f"awq::int4_linear_multi: takes 1 to {MAX_SEGMENTS} segments, got {lens[0]}"
        )
    kps = [tuple(q.shape[1:2]) for q in qweights]  # a list: fake shapes are unhashable SymInts
    if any(kp != kps[0] for kp in kps):
        raise ValueError(
            "awq::int4_linear_multi: every segment must have the same packed K, got qweights "
            f"{[tuple(q.shape) for q in qweights]} (x {tuple(x.shape)})"
        )
    ns = []
    for i, (q, s, z, b) in enumerate(zip(qweights, scales, zeros, biases)):
        try:
            ns.append(check_int4_linear_args(x, q, s, z, group_size, b)[0])
        except ValueError as e:
            raise ValueError(f"awq::int4_linear_multi: segment {i}: {e}") from None
    return ns


@torch.library.custom_op("awq::int4_linear_multi", mutates_args=())
def int4_linear_multi(
    x: torch.Tensor,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """`[int4_linear(x, qweights[i], scales[i], zeros[i], group_size, biases[i]) for i]`.

    Each segment dispatches to `awq::int4_linear`: the reference math on the CPU (so the result
    is bit-identical to the separate calls), its CUDA kernel where one is registered, until a
    fused kernel is registered for this op.
    """
    check_int4_linear_multi_args(x, qweights, scales, zeros, group_size, biases)
    return [torch.ops.awq.int4_linear.default(x, q, s, z, group_size, b)
            for q, s, z, b in zip(qweights, scales, zeros, biases)]


@int4_linear_multi.register_fake
def _(x, qweights, scales, zeros, group_size, biases):
    ns = check_int4_linear_multi_args(x, qweights, scales, zeros, group_size, biases)
    return [x.new_empty((*x.shape[:-1], n)) for n in ns]


def check_int4_linear_glu_args(
    x: torch.Tensor,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
) -> tuple[int, int]:
    """Validate `int4_linear_glu`'s arguments; returns (N, K): two segments (gate, up) as
    `int4_linear_multi` takes them, both of N rows."""
    if len(qweights) != 2:
        raise ValueError(
            f"awq::int4_linear_glu: takes 2 weights (gate, up), got {len(qweights)} (x {tuple(x.shape)})"
        )
    try:
        ns = check_int4_linear_multi_args(x, qweights, scales, zeros, group_size, biases)
    except ValueError as e:
        raise ValueError(f"awq::int4_linear_glu: {e}") from None
    if ns[0] != ns[1]:
        raise ValueError(
            f"awq::int4_linear_glu: gate and up must have the same rows, got qweights "
            f"{[tuple(q.shape) for q in qweights]}"
        )
    return ns[0], x.shape[-1]


@torch.library.custom_op("awq::int4_linear_glu", mutates_args=())
def int4_linear_glu(
    x: torch.Tensor,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """`silu(gate) * up` of `gate, up = int4_linear_multi(x, ...)`, the product in x's dtype (see
    the module docstring for the CUDA kernels' rounding)."""
    check_int4_linear_glu_args(x, qweights, scales, zeros, group_size, biases)
    gate, up = torch.ops.awq.int4_linear_multi.default(x, qweights, scales, zeros, group_size, biases)
    return F.silu(gate) * up


@int4_linear_glu.register_fake
def _(x, qweights, scales, zeros, group_size, biases):
    n, _ = check_int4_linear_glu_args(x, qweights, scales, zeros, group_size, biases)
    return x.new_empty((*x.shape[:-1], n))


def _check_partials_args(x, qweight, scales, zeros, group_size, slices) -> tuple[int, int]:
    """Validate `int4_linear_partials`' arguments; returns (N, K)."""
    n, k = check_int4_linear_args(x, qweight, scales, zeros, group_size, None)
    if slices < 1:
        raise ValueError(f"awq::int4_linear_partials: slices must be >= 1, got {slices}")
    return n, k


@torch.library.custom_op("awq::int4_linear_partials", mutates_args=())
def int4_linear_partials(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    slices: int,
) -> torch.Tensor:
    """float32 [slices, *x.shape[:-1], N]: the products of `slices` consecutive slices of K, whole
    groups each, so that their sum over dim 0 is x @ dequantize(W)^T in float32. How K is cut is
    the implementation's (the CUDA kernel's own plan there); the sum is the contract."""
    _, k = _check_partials_args(x, qweight, scales, zeros, group_size, slices)
    w = dequantize(qweight, scales, zeros, group_size, k, dtype=torch.float32)
    groups = -(-k // group_size)
    per = -(-groups // slices) * group_size
    xf = x.float()
    return torch.stack([xf[..., i * per:(i + 1) * per] @ w[:, i * per:(i + 1) * per].T for i in range(slices)])


@int4_linear_partials.register_fake
def _(x, qweight, scales, zeros, group_size, slices):
    n, _ = _check_partials_args(x, qweight, scales, zeros, group_size, slices)
    return x.new_empty((slices, *x.shape[:-1], n), dtype=torch.float32)


def check_int4_linear_rope_cache_args(
    x: torch.Tensor,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[int, int, int, int]:
    """Validate `int4_linear_rope_cache`'s arguments; returns (heads of q, heads of k and v,
    head dim D, cache length L). Raises with the actual shapes."""
    def bad(msg: str) -> ValueError:
        return ValueError(
            f"awq::int4_linear_rope_cache: {msg} (x {tuple(x.shape)} {x.dtype}, qweights "
            f"{[tuple(q.shape) for q in qweights]}, cos {tuple(cos.shape)} {cos.dtype}, sin "
            f"{tuple(sin.shape)} {sin.dtype}, cache_position {tuple(cache_position.shape)} "
            f"{cache_position.dtype}, k_cache {tuple(k_cache.shape)} {k_cache.dtype}, v_cache "
            f"{tuple(v_cache.shape)} {v_cache.dtype})"
        )

    if len(qweights) != 3:
        raise bad(f"takes 3 weights (q, k, v), got {len(qweights)}")
    try:
        nq, nk, nv = check_int4_linear_multi_args(x, qweights, scales, zeros, group_size, biases)
    except ValueError as e:
        raise ValueError(f"awq::int4_linear_rope_cache: {e}") from None
    if x.dim() != 3:
        raise bad("x must be [batch, tokens, K]")
    b, s = x.shape[0], x.shape[1]
    if k_cache.dim() != 4 or tuple(k_cache.shape) != tuple(v_cache.shape):
        raise bad("k_cache and v_cache must be one [batch, kv heads, length, head dim] shape")
    hkv, length, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    if k_cache.shape[0] != b or d % 2 or nk != nv or nk != hkv * d or nq % d:
        raise bad("the q, k, v rows must be whole heads of the caches' head dim, k and v of the caches' heads")
    if k_cache.dtype != x.dtype or v_cache.dtype != x.dtype:
        raise bad("the caches must have x's dtype")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != x.dtype or t.dim() != 4 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (1, s, d):
            raise bad(f"{name} must be [batch or 1, 1, tokens, head dim] of x's dtype")
    if cache_position.dtype != torch.int64 or tuple(cache_position.shape) not in ((s,), ()):
        raise bad("cache_position must be int64 [tokens] (the positions) or [] (the first position)")
    if len({t.device for t in (x, cos, sin, cache_position, k_cache, v_cache)}) != 1:
        raise bad("all tensors must be on one device")
    return nq // d, hkv, d, length


def cache_positions(cache_position: torch.Tensor, tokens: int) -> torch.Tensor:
    """The [tokens] cache positions `int4_linear_rope_cache` writes at: cache_position itself, or,
    where it is a 0-d tensor (a static cache's length so far, as the pass `defer_cache_counters`
    passes it), cache_position + arange(tokens)."""
    if cache_position.dim():
        return cache_position
    return cache_position + torch.arange(tokens, device=cache_position.device)


def rotate_heads(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`t * cos + rotate_half(t) * sin` on [..., D] heads, as a Llama computes it eagerly
    (rotate_half(t) = cat(-t[..., D/2:], t[..., :D/2]))."""
    h = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., h:], t[..., :h]), dim=-1) * sin


@torch.library.custom_op("awq::int4_linear_rope_cache", mutates_args=("k_cache", "v_cache"))
def int4_linear_rope_cache(
    x: torch.Tensor,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """An attention block's q/k/v projections, rotary embedding and KV-cache write:

        q, k, v = int4_linear_multi(x, qweights, ...)        # x: [B, S, K]
        q, k = rotate_heads(heads(q), cos, sin), rotate_heads(heads(k), cos, sin)
        k_cache.index_copy_(2, cache_position, k); v_cache.index_copy_(2, cache_position, heads(v))
        return q, as [B, S, heads of q * D]

    with heads(t) = t.view(B, S, -1, D).transpose(1, 2), cos, sin [B or 1, 1, S, D] and
    cache_position int64 [S], or a 0-d int64 tensor p standing for p + arange(S) (a static cache's
    length so far: the kernel then reads the cache's own counter, no positions tensor). Each step
    in x's dtype as the unfused graph computes it eagerly (the CUDA kernels round once, after
    the rotation in fp32, as inductor's fused kernel does)."""
    hq, hkv, d, _ = check_int4_linear_rope_cache_args(x, qweights, scales, zeros, group_size, biases, cos, sin,
                                                      cache_position, k_cache, v_cache)
    q, k, v = torch.ops.awq.int4_linear_multi.default(x, qweights, scales, zeros, group_size, biases)
    b, s = x.shape[0], x.shape[1]
    pos = cache_positions(cache_position, s)
    q = rotate_heads(q.view(b, s, hq, d).transpose(1, 2), cos, sin)
    k_cache.index_copy_(2, pos, rotate_heads(k.view(b, s, hkv, d).transpose(1, 2), cos, sin))
    v_cache.index_copy_(2, pos, v.view(b, s, hkv, d).transpose(1, 2))
    return q.transpose(1, 2).reshape(b, s, hq * d)


@int4_linear_rope_cache.register_fake
def _(x, qweights, scales, zeros, group_size, biases, cos, sin, cache_position, k_cache, v_cache):
    hq, _, d, _ = check_int4_linear_rope_cache_args(x, qweights, scales, zeros, group_size, biases, cos, sin,
                                                    cache_position, k_cache, v_cache)
    return x.new_empty((x.shape[0], x.shape[1], hq * d))


def check_add_rms_norm_args(
    residual: torch.Tensor,
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    op: str,
) -> int:
    """Validate the residual add + RMSNorm arguments of the `*_norm` ops; returns the number of
    K slices in `delta` (0: delta is a tensor of residual's shape and dtype; n >= 1: float32
    partial sums [n, *residual.shape], as `int4_linear_partials` makes them)."""
    def bad(msg: str) -> ValueError:
        return ValueError(
            f"awq::{op}: {msg} (residual {tuple(residual.shape)} {residual.dtype}, delta "
            f"{tuple(delta.shape)} {delta.dtype}, delta_bias "
            f"{None if delta_bias is None else (tuple(delta_bias.shape), delta_bias.dtype)}, norm_weight "
            f"{tuple(norm_weight.shape)} {norm_weight.dtype}, eps {eps})"
        )

    if residual.dtype not in (torch.float16, torch.bfloat16, torch.float32) or residual.dim() < 1:
        raise bad("residual must be a floating-point tensor [..., K]")
    k = residual.shape[-1]
    if tuple(delta.shape) == tuple(residual.shape) and delta.dtype == residual.dtype:
        slices = 0
    elif (delta.dtype == torch.float32 and delta.dim() == residual.dim() + 1
          and tuple(delta.shape[1:]) == tuple(residual.shape) and delta.shape[0] >= 1):
        slices = int(delta.shape[0])
    else:
        raise bad("delta must have residual's shape and dtype, or be float32 K-slice partials "
                  "[slices, *residual.shape]")
    if delta_bias is not None and (slices == 0 or tuple(delta_bias.shape) != (k,)
                                   or delta_bias.dtype != residual.dtype):
        raise bad(f"delta_bias goes with float32 partials only, as [{k}] of residual's dtype")
    if tuple(norm_weight.shape) != (k,) or norm_weight.dtype != residual.dtype:
        raise bad(f"norm_weight must be [{k}] of residual's dtype")
    if not (isinstance(eps, float) and eps >= 0.0):
        raise bad("eps must be a float >= 0")
    devices = {t.device for t in (residual, delta, norm_weight, *(() if delta_bias is None else (delta_bias,)))}
    if len(devices) != 1:
        raise bad("all tensors must be on one device")
    return slices


def add_rms_norm(
    residual: torch.Tensor,
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, x): a decoder layer's residual add and the next RMSNorm, as a Llama computes them
    eagerly (transformers' `LlamaRMSNorm`), each step in its own dtype:

        d = delta                                   # or, from K-slice partials:
        d = (delta.sum(0) + delta_bias).to(residual.dtype)
        h = residual + d
        x = norm_weight * (h.float() * rsqrt(h.float().pow(2).mean(-1) + eps)).to(h.dtype)
    """
    if delta.dim() == residual.dim() + 1:
        d = delta.sum(0)
        if delta_bias is not None:
            d = d + delta_bias
        delta = d.to(residual.dtype)
    h = residual + delta
    hf = h.to(torch.float32)
    x = norm_weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return h, x


@torch.library.custom_op("awq::int4_linear_glu_norm", mutates_args=())
def int4_linear_glu_norm(
    residual: torch.Tensor,
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4_linear_glu(x, ...), h) with (h, x) = add_rms_norm(residual, delta, delta_bias,
    norm_weight, eps): a decoder layer's residual add, the MLP's RMSNorm and its gated
    projections in one call (the CUDA decode kernel makes x while it stages it)."""
    check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "int4_linear_glu_norm")
    h, x = add_rms_norm(residual, delta, delta_bias, norm_weight, eps)
    return torch.ops.awq.int4_linear_glu.default(x, qweights, scales, zeros, group_size, biases), h


@int4_linear_glu_norm.register_fake
def _(residual, delta, delta_bias, norm_weight, eps, qweights, scales, zeros, group_size, biases):
    check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "int4_linear_glu_norm")
    n, _ = check_int4_linear_glu_args(residual, qweights, scales, zeros, group_size, biases)
    return residual.new_empty((*residual.shape[:-1], n)), torch.empty_like(residual)


@torch.library.custom_op("awq::int4_linear_rope_cache_norm", mutates_args=("k_cache", "v_cache"))
def int4_linear_rope_cache_norm(
    residual: torch.Tensor,
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    qweights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    group_size: int,
    biases: Sequence[torch.Tensor | None],
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4_linear_rope_cache(x, ...), h) with (h, x) = add_rms_norm(residual, delta,
    delta_bias, norm_weight, eps): a decoder layer's residual add, the attention's RMSNorm, its
    q/k/v projections, rotary embedding and KV-cache write in one call."""
    check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "int4_linear_rope_cache_norm")
    h, x = add_rms_norm(residual, delta, delta_bias, norm_weight, eps)
    q = torch.ops.awq.int4_linear_rope_cache.default(x, qweights, scales, zeros, group_size, biases, cos, sin,
                                                      cache_position, k_cache, v_cache)
    return q, h


@int4_linear_rope_cache_norm.register_fake
def _(residual, delta, delta_bias, norm_weight, eps, qweights, scales, zeros, group_size, biases, cos, sin,
      cache_position, k_cache, v_cache):
    check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "int4_linear_rope_cache_norm")
    hq, _, d, _ = check_int4_linear_rope_cache_args(residual, qweights, scales, zeros, group_size, biases, cos, sin,
                                                    cache_position, k_cache, v_cache)
    return residual.new_empty((residual.shape[0], residual.shape[1], hq * d)), torch.empty_like(residual)


@torch.library.custom_op("awq::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    residual: torch.Tensor,
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm as one op, (h, x): what `swap_add_rms_norm` puts in place of a residual add
    and the RMSNorm after it where no projection takes them in. On CUDA one launch of
    csrc/add_rms_norm.cu; elsewhere add_rms_norm in torch ops."""
    check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "add_rms_norm")
    return add_rms_norm(residual, delta, delta_bias, norm_weight, eps)


@add_rms_norm_op.register_fake
def _(residual, delta, delta_bias, norm_weight, eps):
    check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "add_rms_norm")
    return torch.empty_like(residual), torch.empty_like(residual)


DECODE_ATTENTION_MAX_ROWS = 8
"""Most query rows a KV head `decode_attention`'s CUDA kernel takes (query heads a KV head times
query tokens): decode sizes; beyond it torch's attention serves."""


def check_decode_attention_args(q, k, v, attn_mask, scale, enable_gqa) -> tuple[int, int]:
    """Raises ValueError for arguments `decode_attention` cannot take; returns (query heads a KV
    head, positions)."""

    def bad(why: str) -> ValueError:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in (q, k, v, attn_mask)]
        return ValueError(f"decode_attention: {why} (q, k, v, attn_mask: {shapes})")

    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise bad("q, k and v must be 4-D tensors [batch, heads, tokens or positions, head dim]")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise bad("q, k and v must have one floating dtype")
    b, hq, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise bad("k must be [batch, kv heads, positions, q's head dim] and v [batch, kv heads, positions, *]")
    hkv, length = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv or (hq != hkv and not enable_gqa):
        raise bad("q's heads must equal k's, or be a multiple of them with enable_gqa")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool
                                                            or attn_mask.dtype.is_floating_point):
            raise bad("attn_mask must be a bool or floating tensor")
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), (b, hq, q.shape[2], length))
        except RuntimeError:
            raise bad("attn_mask must broadcast to [batch, heads, tokens, positions]") from None
        if attn_mask.device != q.device:
            raise bad("attn_mask must be on q's device")
    if scale is not None and not isinstance(scale, float):
        raise bad("scale must be a float or None")
    if k.device != q.device or v.device != q.device:
        raise bad("q, k and v must be on one device")
    return hq // hkv, length


@torch.library.custom_op("awq::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa)`
    without dropout or a causal flag, as a contiguous [B, Hq, S, Dv] tensor; the op the pass
    `swap_decode_attention` puts in place of a decode step's attention. On CUDA, for a few query
    rows a KV head, a kernel that reads only the positions the mask leaves (csrc/decode_attention.cu);
    elsewhere torch's attention."""
    check_decode_attention_args(q, k, v, attn_mask, scale, enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                          enable_gqa=enable_gqa).contiguous()


@decode_attention.register_fake
def _(q, k, v, attn_mask, scale, enable_gqa):
    check_decode_attention_args(q, k, v, attn_mask, scale, enable_gqa)
    return q.new_empty((*q.shape[:3], v.shape[3]))
