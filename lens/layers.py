"""Huginn's building blocks: RMSNorm, interleaved rotary embedding, attention, gated MLP, sandwich block.

Parameter names equal the checkpoint keys (``attn.Wqkv``, ``attn.qk_bias``, ``mlp.fc``, ``norm_1`` …)
so a real checkpoint loads by name. Each block exposes TransformerLens-style hook points.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

import kernels
from lens.cache import KVCache
from lens.config import RecurrentDepthConfig
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


def apply_rotary(x: Float[Tensor, "B S H D"], freqs: Float[Tensor, "B S 1 P 2"]) -> Float[Tensor, "B S H D"]:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` (not the rotate-half layout), in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = freqs[..., 0], freqs[..., 1]
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 1] * cos + pairs[..., 0] * sin
    return torch.stack([real, imag], dim=-1).flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    """Fused ``Wqkv`` (rows q | k | v), optional qk bias before the rotary, grouped key/value heads."""

    def __init__(self, config: RecurrentDepthConfig) -> None:
        super().__init__()
        self.n_head = config.n_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        self.chunks = [q_dim, kv_dim, kv_dim]
        self.Wqkv = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=False)
        if config.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_head, self.head_dim))
        else:
            self.qk_bias = None
        self.proj = nn.Linear(q_dim, config.n_embd, bias=False)

    def forward(
        self,
        x: Float[Tensor, "B S d"],
        freqs: Float[Tensor, "B S 1 P 2"],
        cache_index: int,
        mask: Bool[Tensor, "B 1 S K"] | None,
        cache: KVCache | None,
    ) -> Float[Tensor, "B S d"]:
        B, S, _ = x.shape
        q, k, v = self.Wqkv(x).split(self.chunks, dim=2)
        q = q.view(B, S, self.n_head, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_bias is not None:
            if self.n_kv_heads != self.n_head:
                raise NotImplementedError("qk_bias with grouped key/value heads is not part of Huginn")
            q_bias, k_bias = self.qk_bias.split(1, dim=0)
            q, k = (q + q_bias).to(q.dtype), (k + k_bias).to(q.dtype)
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(cache_index, k, v)
        if self.n_kv_heads != self.n_head:
            repeat = self.n_head // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is None and k.shape[2] == S:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if mask is None:  # queries are the last S of the keys (cached decoding)
                mask = causal_mask(S, k.shape[2], x.device)[None, None]
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, -1))


def causal_mask(queries: int, keys: int, device: torch.device) -> Bool[Tensor, "S K"]:
    """Lower-right aligned causal mask: query i sees keys up to ``keys - queries + i``."""
    q = torch.arange(queries, device=device)[:, None] + (keys - queries)
    return torch.arange(keys, device=device)[None, :] <= q


class GatedMLP(nn.Module):
    """Gated SiLU MLP with one fused input projection ``fc`` = [gate | up]."""

    def __init__(self, config: RecurrentDepthConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(kernels.swiglu(self.fc(x)))


class SandwichBlock(nn.Module):
    """``x = norm_2(attn(norm_1(x)) + x); x = norm_4(mlp(norm_3(x)) + x)``."""

    def __init__(self, config: RecurrentDepthConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_3 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.norm_4 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: Float[Tensor, "B S d"],
        freqs: Float[Tensor, "B S 1 P 2"],
        cache_index: int,
        mask: Bool[Tensor, "B 1 S K"] | None = None,
        cache: KVCache | None = None,
    ) -> Float[Tensor, "B S d"]:
        attn_out = self.hook_attn_out(self.attn(self.norm_1(x), freqs, cache_index, mask, cache))
        x = self.hook_resid_mid(self.norm_2(attn_out, residual=x))
        mlp_out = self.hook_mlp_out(self.mlp(self.norm_3(x)))
        return self.hook_resid_post(self.norm_4(mlp_out, residual=x))


def init_block_(block: SandwichBlock, std: float, out_std: float) -> None:
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
    "RMSNorm",
    "CausalSelfAttention",
    "GatedMLP",
    "SandwichBlock",
    "precompute_freqs_cis",
    "apply_rotary",
    "causal_mask",
    "init_block_",
]
