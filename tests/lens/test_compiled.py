"""The opt-in compiled core loop (issue #15.2): no recompilation per iteration or decoding step, same results.

The graphs are captured by dynamo with the ``eager`` backend here (what recompiles is decided by dynamo,
whatever the backend; inductor's C++ compilation takes minutes on a 2-core CI machine). The benchmark
``benchmarks/bench_vs_authors.py`` runs the inductor build and checks its results against the authors'.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import lens
from tests.conftest import small_config


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_no_recompilation_per_iteration_or_decoding_step(small_model, fresh_dynamo):
    eager = small_model
    compiled = lens.RecurrentDepthLM(small_config()).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(backend="eager")
    assert compiled.blocks_compiled and not eager.blocks_compiled
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    caches = {"eager": eager.new_cache(), "compiled": compiled.new_cache()}
    with torch.no_grad():
        for name, model in (("eager", eager), ("compiled", compiled)):
            model(ids[:, :6], num_steps=4, init_state="zeros", cache=caches[name])
        after_prefill = graphs()
        steps = []
        for i, T in enumerate((4, 4, 6, 3, 8)):  # one-token steps at changing depths, a growing cache
            tok = ids[:, 6 + i : 7 + i] if 6 + i < 9 else ids[:, -1:]
            out = {name: m(tok, num_steps=T, init_state="zeros", cache=caches[name]).logits
                   for name, m in (("eager", eager), ("compiled", compiled))}  # fmt: skip
            torch.testing.assert_close(out["compiled"], out["eager"], rtol=1e-5, atol=1e-5)
            steps.append(graphs())
        compiled(ids, num_steps=5, init_state="zeros")  # a prefill at another depth and length
        compiled(ids[:, :4], num_steps=2, init_state="zeros")
    assert after_prefill == 2  # before and after the cache, one graph each for all blocks and iterations
    assert steps == [4] * len(steps)  # one-token shapes once (size 1 is specialised), then never again
    assert graphs() == 4
    assert counters["frames"]["total"] == counters["frames"]["ok"]


@pytest.mark.parametrize("family", ["retrofit", "ouro"])
def test_every_family_compiles_to_the_same_logits(family, fresh_dynamo, tmp_path):
    from tests.conftest import save_arith_model

    model = lens.load_model(save_arith_model(tmp_path / family, family))
    ids = torch.randint(3, 30, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = {} if family == "ouro" else {"init_state": "zeros"}
    with torch.no_grad():
        expected = model(ids, num_steps=3, return_trace=True, **kwargs)
        model.compile_blocks(backend="eager")
        got = model(ids, num_steps=3, return_trace=True, **kwargs)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for site in expected.trace.sites():  # the stream is the same: every state, every iteration
        torch.testing.assert_close(got.trace[site], expected.trace[site], rtol=1e-5, atol=1e-5)


def test_hooked_blocks_run_eagerly_and_uncompile_restores(small_model, fresh_dynamo):
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    double = [("transformer.core_block.1.hook_resid_mid", lambda x, hook: x * 2)]
    with torch.no_grad():
        expected = small_model.run_with_hooks(ids, 3, "zeros", fwd_hooks=double).logits
        small_model.compile_blocks(backend="eager")
        got = small_model.run_with_hooks(ids, 3, "zeros", fwd_hooks=double).logits
        small_model.uncompile_blocks()
        plain = small_model(ids, 3, "zeros").logits
    assert torch.equal(got, expected)  # the hooked block ran its eager forward
    assert not small_model.blocks_compiled and not torch.equal(plain, expected)


def test_load_model_compile_flag():
    model = lens.load_model("tiny-arith", compile=True)
    assert model.blocks_compiled
    assert not lens.load_model("tiny-arith").blocks_compiled
