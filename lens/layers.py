"""The blocks of every family: RMSNorm, both rotary layouts, attention, gated MLPs, and the blocks.

- Huginn: fused ``Wqkv`` attention with qk bias and interleaved-pair RoPE, the sandwich block
  (:class:`SandwichBlock`, four norms).
- Retrofitted recurrence: the same parameter names, Llama's pre-norm block (:class:`PreNormBlock`,
  ``norm_1``/``norm_2``) and rotate-half RoPE from ``rope_theta``.
- Ouro: separate ``q/k/v/o_proj`` (:class:`SplitAttention`), sandwich norms around both sublayers
  added to the residual (:class:`OuroBlock`), rotate-half RoPE.

Parameter names equal each family's checkpoint keys so a real checkpoint loads by name. Every block
is called as ``block(x, rope, cache_index, mask, cache)`` and exposes the same TransformerLens-style
hook points (``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

import kernels
from lens.cache import KVCache
from lens.errors import ConfigError
from lens.hooks import HookPoint


class RMSNorm(nn.Module):
    """Llama RMSNorm as Huginn computes it: in float32, cast back, then times the gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``norm(x + residual)``; the sum is fused with the norm on GPU."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


def precompute_freqs_cis(head_dim: int, length: int, base: float) -> Float[Tensor, "1 S 1 P 2"]:
    """Cos/sin table of the interleaved-pair rotary embedding, ``[1, S, 1, head_dim / 2, 2]``."""
    inv_freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freqs)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)[None, :, None, :, :]


def rotary_rotation(freqs: Float[Tensor, "B S 1 P 2"]) -> Float[Tensor, "B S 1 P 2 2"]:
    """Each pair's rotation ``[[cos, sin], [-sin, cos]]`` from a cos/sin table (built once per forward pass)."""
    cos, sin = freqs[..., 0], freqs[..., 1]
    return torch.stack([torch.stack([cos, sin], dim=-1), torch.stack([-sin, cos], dim=-1)], dim=-2)


def apply_rotary(
    x: Float[Tensor, "B S H D"], rotation: Float[Tensor, "B S 1 P 2 2"] | Float[Tensor, "B S 1 P 2"]
) -> Float[Tensor, "B S H D"]:
    """Rotate adjacent pairs ``(a, b) = (x[2i], x[2i+1])`` (not the rotate-half layout), in float32:
    ``(a cos - b sin, b cos + a sin)``.

    ``rotation`` is :func:`rotary_rotation`'s table (a cos/sin table is converted here). A small ``x``
    (decoding: a token's heads) is rotated as one product-sum per pair, ``a cos + b (-sin)`` and
    ``a sin + b cos``, the same roundings bit for bit in two ops instead of eight, where the op count
    is the cost; a large one (prefill) elementwise, where memory passes are.
    """
    if rotation.dim() == x.dim() + 1:
        rotation = rotary_rotation(rotation)
    pairs = x.float().unflatten(-1, (-1, 2))
    if x.numel() <= _PRODUCT_SUM_MAX:
        return (pairs.unsqueeze(-1) * rotation).sum(-2).flatten(-2).type_as(x)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = rotation[..., 0, 0], rotation[..., 0, 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


#: Largest ``x`` (elements) that :func:`apply_rotary` rotates as a product-sum; measured on a 2-core CPU
#: (1 thread): 17 vs 36 µs at 256 elements, even at 2048, 2× slower at 8192.
_PRODUCT_SUM_MAX = 2048


def attend(
    q: Float[Tensor, "B S H D"],
    k: Float[Tensor, "B S K D"],
    v: Float[Tensor, "B S K D"],
    cache_index: int,
    mask: Bool[Tensor, "B 1 S L"] | None,
    cache: KVCache | None,
) -> Float[Tensor, "B S HD"]:
    """Causal scaled-dot-product attention after RoPE, shared by every family: the cache, grouped
    key/value heads (query head ``h`` reads key/value head ``h // (H / K)``), the mask."""
    B, S, n_head, _ = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cache is not None:  # the cache's lookup strategy may leave missing entries out of the mask
        k, v, mask = cache.attend(cache_index, k, v, mask)
    if k.shape[1] != n_head:
        repeat = n_head // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if mask is None and k.shape[2] == S:
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif mask is None and S == 1:  # one query, the last key: it sees every key
        y = nn.functional.scaled_dot_product_attention(q, k, v)
    else:
        if mask is None:  # queries are the last S of the keys (cached decoding)
            mask = causal_mask(S, k.shape[2], q.device)[None, None]
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, S, -1)


class CausalSelfAttention(nn.Module):
    """Fused ``Wqkv`` (rows q | k | v), optional qk bias before the rotary, grouped key/value heads.

    ``rope_style`` is ``"interleaved"`` (Huginn) or ``"half"`` (retrofits, whose Llama layers rotate halves);
    ``freqs`` is the model's ``rope`` output for it: :func:`rotary_rotation`'s ``[B, S, 1, P, 2, 2]``
    (interleaved) or :class:`RotaryEmbedding`'s cos/sin ``[B, S, 1, D, 2]`` (half).
    """

    def __init__(self, config: Any, rope_style: str = "interleaved") -> None:
        super().__init__()
        self.rope_style = rope_style
        self.n_head = config.n_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        self.Wqkv = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=False)
        self.qk_bias: nn.Parameter | None
        if config.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_head, self.head_dim))
        else:
            self.qk_bias = None
        self.proj = nn.Linear(q_dim, config.n_embd, bias=False)

    def forward(
        self,
        x: Float[Tensor, "B S d"],
        freqs: Tensor,
        cache_index: int,
        mask: Bool[Tensor, "B 1 S K"] | None,
        cache: KVCache | None,
    ) -> Float[Tensor, "B S d"]:
        q, k, v = self.project(x, freqs)
        return self.output(attend(q, k, v, cache_index, mask, cache))

    def output(self, y: Float[Tensor, "B S HD"]) -> Float[Tensor, "B S d"]:
        """The output projection of the attended values."""
        return self.proj(y)

    def project(
        self, x: Float[Tensor, "B S d"], freqs: Tensor
    ) -> tuple[Float[Tensor, "B S H D"], Float[Tensor, "B S K D"], Float[Tensor, "B S K D"]]:
        """Queries and keys (biased, rotated) and values of ``x``.

        The ``Wqkv`` rows are q | k | v, so queries and keys are one contiguous slice of its output:
        the bias is added and the rotary applied to that slice once (elementwise, so each value is
        the same as rotating q and k apart, in half the ops).
        """
        B, S, _ = x.shape
        H, K, D = self.n_head, self.n_kv_heads, self.head_dim
        qkv = self.Wqkv(x)
        qk = qkv[..., : (H + K) * D].view(B, S, H + K, D)
        v = qkv[..., (H + K) * D :].view(B, S, K, D)
        if self.qk_bias is not None:
            if K != H:
                raise NotImplementedError("qk_bias with grouped key/value heads is not part of Huginn")
            qk = (qk + self.qk_bias.view(2 * H, D)).to(qk.dtype)
        rotate = apply_rotary if self.rope_style == "interleaved" else apply_rotary_half
        qk = rotate(qk, freqs)
        return qk[:, :, :H], qk[:, :, H:], v


def apply_rotary_half(
    x: Float[Tensor, "B S H D"], cos_sin: Float[Tensor, "B S 1 D 2"]
) -> Float[Tensor, "B S H D"]:
    """Llama's rotate-half RoPE: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, in float32."""
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (h * cos_sin[..., 0] + rotated * cos_sin[..., 1]).type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE angles from ``rope_theta`` (and ``rope_scaling``), as transformers' Llama computes them.

    ``inv_freq`` is a non-persistent float32 buffer (not in checkpoints); ``forward(positions)`` returns
    cos and sin stacked on the last axis, ``[B, S, 1, D, 2]``. Supported ``rope_scaling`` types:
    default, ``linear`` and ``llama3`` (Llama-3.x conversions); anything else is a ``ConfigError``.
    """

    inv_freq: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, float(theta), dict(scaling or {})
        self.rope_type = str(self.scaling.get("rope_type", self.scaling.get("type", "default")))
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"rope_scaling type {self.rope_type!r} is not supported (looplens implements default, linear, llama3)"
            )
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        cfg = self.scaling
        if self.rope_type == "linear":
            inv = inv / float(cfg["factor"])
        elif self.rope_type == "llama3":
            try:
                factor, low, high = (
                    float(cfg["factor"]),
                    float(cfg["low_freq_factor"]),
                    float(cfg["high_freq_factor"]),
                )
                old = float(cfg["original_max_position_embeddings"])
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"rope_scaling of type llama3 lacks or mistypes a field: {err}") from err
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        return inv

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        """Keep the frequencies in float32 whatever dtype the weights are cast to."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.inv_freq = self.compute_inv_freq(self.inv_freq.device)
        return self

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on the meta device."""
        self.inv_freq = self.compute_inv_freq(device)

    def forward(self, positions: Tensor) -> Float[Tensor, "B S 1 D 2"]:
        angles = positions.float()[..., None] * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((angles, angles), dim=-1)
        cos_sin = torch.stack([emb.cos(), emb.sin()], dim=-1) * self.attention_scaling
        return cos_sin[:, :, None]


def causal_mask(queries: int, keys: int, device: torch.device) -> Bool[Tensor, "S K"]:
    """Lower-right aligned causal mask: query i sees keys up to ``keys - queries + i``."""
    q = torch.arange(queries, device=device)[:, None] + (keys - queries)
    return torch.arange(keys, device=device)[None, :] <= q


class GatedMLP(nn.Module):
    """Gated SiLU MLP with one fused input projection ``fc`` = [gate | up]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(kernels.swiglu(self.fc(x)))


class LoopBlock(nn.Module):
    """What every family's block shares: ``block(x, rope, cache_index, mask, cache)``, its hook points, and
    the two halves around the key/value cache that :mod:`lens.compiled` compiles.

    ``forward`` is ``after_attention(x, hook_attn_out(attention(attention_norm(x), …)))``; the halves
    :meth:`attention_inputs` (norm, projections, rotary) and :meth:`attention_finish` (output projection
    and everything after) are the same modules' same calls with the cache update and the attention in
    between, so a compiled block computes what the eager one does.
    """

    attention_name: str
    attention_norm_name: str

    def add_hook_points(self) -> None:
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: Float[Tensor, "B S d"],
        rope: Tensor,
        cache_index: int,
        mask: Bool[Tensor, "B 1 S K"] | None = None,
        cache: KVCache | None = None,
    ) -> Float[Tensor, "B S d"]:
        attention = getattr(self, self.attention_name)
        normed = getattr(self, self.attention_norm_name)(x)
        return self.after_attention(x, self.hook_attn_out(attention(normed, rope, cache_index, mask, cache)))

    def after_attention(
        self, x: Float[Tensor, "B S d"], attn_out: Float[Tensor, "B S d"]
    ) -> Float[Tensor, "B S d"]:
        """The residual update from the attention output on (the MLP half of the block)."""
        raise NotImplementedError

    def attention_inputs(self, x: Float[Tensor, "B S d"], rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of ``x`` ``[B, S, heads, D]`` (before the cache)."""
        return getattr(self, self.attention_name).project(getattr(self, self.attention_norm_name)(x), rope)

    def attention_finish(self, x: Float[Tensor, "B S d"], attended: Tensor) -> Float[Tensor, "B S d"]:
        """The block's output from its input and the attended values ``[B, S, heads * D]``."""
        return self.after_attention(
            x, self.hook_attn_out(getattr(self, self.attention_name).output(attended))
        )

    def hook_points(self) -> tuple[HookPoint, ...]:
        return (self.hook_attn_out, self.hook_resid_mid, self.hook_mlp_out, self.hook_resid_post)


class SandwichBlock(LoopBlock):
    """``x = norm_2(attn(norm_1(x)) + x); x = norm_4(mlp(norm_3(x)) + x)``."""

    attention_name, attention_norm_name = "attn", "norm_1"

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_3 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.norm_4 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.add_hook_points()

    def after_attention(
        self, x: Float[Tensor, "B S d"], attn_out: Float[Tensor, "B S d"]
    ) -> Float[Tensor, "B S d"]:
        x = self.hook_resid_mid(self.norm_2(attn_out, residual=x))
        mlp_out = self.hook_mlp_out(self.mlp(self.norm_3(x)))
        return self.hook_resid_post(self.norm_4(mlp_out, residual=x))


class PreNormBlock(LoopBlock):
    """Llama's pre-norm block under Huginn's names (retrofitted recurrence):
    ``x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))``, rotate-half RoPE."""

    attention_name, attention_norm_name = "attn", "norm_1"

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, rope_style="half")
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = GatedMLP(config)
        self.add_hook_points()

    def after_attention(
        self, x: Float[Tensor, "B S d"], attn_out: Float[Tensor, "B S d"]
    ) -> Float[Tensor, "B S d"]:
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.norm_2(x)))
        return self.hook_resid_post(x + mlp_out)


class SplitAttention(nn.Module):
    """Separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` without biases, rotate-half RoPE, grouped
    key/value heads (Ouro's, Qwen-style attention)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=False)

    def forward(
        self,
        x: Float[Tensor, "B S d"],
        rope: Float[Tensor, "B S 1 D 2"],
        cache_index: int,
        mask: Bool[Tensor, "B 1 S K"] | None,
        cache: KVCache | None,
    ) -> Float[Tensor, "B S d"]:
        q, k, v = self.project(x, rope)
        return self.output(attend(q, k, v, cache_index, mask, cache))

    def output(self, y: Float[Tensor, "B S HD"]) -> Float[Tensor, "B S d"]:
        """The output projection of the attended values."""
        return self.o_proj(y)

    def project(
        self, x: Float[Tensor, "B S d"], rope: Float[Tensor, "B S 1 D 2"]
    ) -> tuple[Float[Tensor, "B S H D"], Float[Tensor, "B S K D"], Float[Tensor, "B S K D"]]:
        """Rotated queries and keys (one rotary call on both, joined on the head axis) and values."""
        B, S, _ = x.shape
        H = self.n_head
        q = self.q_proj(x).view(B, S, H, self.head_dim)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        qk = apply_rotary_half(torch.cat([q, k], dim=2), rope)
        return qk[:, :, :H], qk[:, :, H:], v


class SplitMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Ouro's, Llama-style MLP)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        d, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class OuroBlock(LoopBlock):
    """Ouro's decoder layer: a norm before and after each sublayer, inside the residual.

    ``x = x + input_layernorm_2(attn(input_layernorm(x)))``;
    ``x = x + post_attention_layernorm_2(mlp(post_attention_layernorm(x)))``.
    """

    attention_name, attention_norm_name = "self_attn", "input_layernorm"

    def __init__(self, config: Any) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps=eps)
        self.self_attn = SplitAttention(config)
        self.input_layernorm_2 = RMSNorm(d, eps=eps)
        self.post_attention_layernorm = RMSNorm(d, eps=eps)
        self.mlp = SplitMLP(config)
        self.post_attention_layernorm_2 = RMSNorm(d, eps=eps)
        self.add_hook_points()

    def after_attention(
        self, x: Float[Tensor, "B S d"], attn_out: Float[Tensor, "B S d"]
    ) -> Float[Tensor, "B S d"]:
        x = self.hook_resid_mid(x + self.input_layernorm_2(attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x)))
        return self.hook_resid_post(x + self.post_attention_layernorm_2(mlp_out))


def init_block_(block: nn.Module, std: float, out_std: float) -> None:
    """Huginn's "takase" initialisation: normal(std) inputs, normal(out_std) output projections, unit norms."""
    for name, param in block.named_parameters():
        if name.startswith("norm_"):
            nn.init.ones_(param)
        elif name.endswith("qk_bias"):
            nn.init.zeros_(param)
        elif name.endswith("proj.weight"):
            nn.init.trunc_normal_(param, std=out_std, a=-3 * out_std, b=3 * out_std)
        else:
            nn.init.trunc_normal_(param, std=std, a=-3 * std, b=3 * std)


__all__ = [
    "LoopBlock",
    "RMSNorm",
    "CausalSelfAttention",
    "GatedMLP",
    "OuroBlock",
    "PreNormBlock",
    "RotaryEmbedding",
    "SandwichBlock",
    "SplitAttention",
    "SplitMLP",
    "apply_rotary",
    "apply_rotary_half",
    "attend",
    "causal_mask",
    "init_block_",
    "precompute_freqs_cis",
    "rotary_rotation",
]
