"""The decoding hot path (issue #15.1): each shortcut gives the same bits as the plain expression it replaces."""

import pytest
import torch
import torch.nn.functional as F

import kernels
import lens
from lens.hooks import HookPoint
from lens.layers import _PRODUCT_SUM_MAX, apply_rotary, precompute_freqs_cis, rotary_rotation


def rotate_pairs_elementwise(x, freqs):
    """Huginn's interleaved-pair rotary as its authors write it: four products, a difference, a sum."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = freqs[..., 0], freqs[..., 1]
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 1] * cos + pairs[..., 0] * sin
    return torch.stack([real, imag], dim=-1).flatten(-2).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 3, 6), (1, 1, 7, 34), (2, 9, 6, 22), (3, 37, 5, 18)])
def test_rotary_is_bit_identical_to_the_elementwise_formula(shape, dtype):
    """Both forms (product-sum for small inputs, elementwise for large ones) and both table forms."""
    gen = torch.Generator().manual_seed(sum(shape))
    B, S, H, D = shape
    x = (torch.randn(shape, generator=gen) * 30).to(dtype)
    freqs = precompute_freqs_cis(D, 64, 50000.0)[0, torch.randint(0, 64, (B, S), generator=gen)]
    expected = rotate_pairs_elementwise(x, freqs)
    assert (x.numel() <= _PRODUCT_SUM_MAX) == (S == 1)  # the shapes cover both forms
    for table in (freqs, rotary_rotation(freqs)):
        out = apply_rotary(x, table)
        assert out.dtype == dtype
        assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip


def test_one_query_without_a_mask_is_the_masked_attention():
    """A single cached-decoding query sees every key: SDPA without a mask gives the all-True mask's bits."""
    gen = torch.Generator().manual_seed(0)
    for K, D in ((1, 16), (33, 32), (130, 96)):
        q, k, v = (torch.randn(2, 4, n, D, generator=gen) for n in (1, K, K))
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(1, 1, 1, K, dtype=torch.bool))
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), masked)


def test_cached_decoding_equals_the_full_forward(small_model):
    """Prefill then one-token steps (no mask, one mask per forward) give the full forward's logits."""
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = small_model(ids, num_steps=3, init_state="zeros").logits
        cache = small_model.new_cache()
        parts = [small_model(ids[:, :5], num_steps=3, init_state="zeros", cache=cache).logits]
        parts.append(small_model(ids[:, 5:7], num_steps=3, init_state="zeros", cache=cache).logits)
        for i in (7, 8):
            parts.append(small_model(ids[:, i : i + 1], num_steps=3, init_state="zeros", cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_hook_points_skip_the_module_call_only_when_nothing_is_attached(small_model):
    point = small_model.hook_dict["transformer.core_block.0.hook_resid_post"]
    x = torch.randn(2, 3)
    assert point(x) is x
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(type(module).__name__)
    )
    try:
        point(x)
    finally:
        handle.remove()
    assert seen == ["HookPoint"]  # a global hook sees hook points too
    point.forward = lambda t: t * 2  # a tool that replaces forward on the instance is honoured
    try:
        assert torch.equal(point(x), x * 2)
    finally:
        del point.forward
    fired = []
    with small_model.hooks(
        [("transformer.core_block.0.hook_resid_post", lambda a, hook: fired.append(hook.iteration))]
    ):
        with torch.no_grad():
            small_model(torch.tensor([[1, 2]]), num_steps=2, init_state="zeros")
    assert fired == [1, 2]


def test_one_iteration_clock_per_model(small_model):
    points = list(small_model.hook_dict.values())
    assert len({id(p.clock) for p in points}) == 1
    small_model.set_hook_iteration(7)
    assert {p.iteration for p in points} == {7}
    small_model.set_hook_iteration(0)
    standalone = HookPoint()
    standalone.iteration = 3
    assert standalone.iteration == 3 and all(p.iteration == 0 for p in points)


def test_core_ops_on_cpu_do_not_read_the_switches(monkeypatch):
    """CPU tensors cannot use Triton, so the core ops decide from the device alone; the lens pass and
    ``backend_for`` still read (and check) ``LOOPLENS_KERNELS``."""
    x, w = torch.randn(2, 8), torch.ones(8)
    monkeypatch.setenv(kernels.dispatch.ENV_VAR, "not-a-backend")
    assert not kernels.dispatch.use_triton(x)
    assert torch.equal(kernels.rms_norm(x, w), kernels.core_ops.rms_norm_reference(x, w))
    with pytest.raises(ValueError, match="LOOPLENS_KERNELS"):
        kernels.backend_for(x)


def test_rotation_table_follows_the_rotary_buffer():
    model = lens.RecurrentDepthLM(
        lens.RecurrentDepthConfig(n_embd=32, n_heads=2, vocab_size=50, block_size=16)
    )
    positions = torch.arange(5)[None]
    first = model.rope(positions)
    assert torch.equal(first, rotary_rotation(model.freqs_cis[0, positions]))
    with torch.no_grad():
        model.freqs_cis.mul_(2)  # an in-place write invalidates the cached rotations
    assert torch.equal(model.rope(positions), rotary_rotation(model.freqs_cis[0, positions]))
    assert not torch.equal(model.rope(positions), first)
