"""Every family reproduces its authors' code (the ouro-tiny and retrofit-tiny fixtures), loads by its own
key names, is recognised from config + weights, streams the same way, and (Ouro) exits early for real."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lens
from lens import GateExit
from lens.errors import CheckpointError, ConfigError, InputError
from lens.exit_gate import exit_distribution
from tests.conftest import data_path

OURO = data_path("fixtures", "ouro-tiny")
RETROFIT = data_path("fixtures", "retrofit-tiny")
HUGINN = data_path("fixtures", "huginn-tiny")


def assert_rel(actual, expected, tol=1e-5):
    """Within ``tol`` relative to the reference's largest magnitude, element by element."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module")
def ouro():
    return lens.load_model(OURO / "checkpoint"), load_file(str(OURO / "reference.safetensors"))


@pytest.fixture(scope="module")
def retrofit():
    return lens.load_model(RETROFIT / "checkpoint"), load_file(str(RETROFIT / "reference.safetensors"))


# ---------------------------------------------------------------- parity with the authors' code
@pytest.mark.parametrize("i", [0, 1])
def test_ouro_states_logits_gate_and_exit_modes_match_reference(ouro, i):
    model, ref = ouro
    ids = ref[f"input_ids_{i}"]
    with torch.no_grad():
        out = model(ids, return_trace=["latent"])
        assert out.num_steps == 4 and model.config.total_ut_steps == 4
        assert_rel(out.trace["latent"], ref[f"step_states_{i}"])
        for t in range(4):  # the pinned call: readout after t + 1 iterations = exit_at_step=t
            assert_rel(model(ids, num_steps=t + 1).logits, ref[f"step_logits_{i}"][t])
        gate_logits = model.model.early_exit_gate(out.trace["latent"]).squeeze(-1).permute(1, 2, 0)
        assert_rel(gate_logits, ref[f"gate_logits_{i}"])
        assert_rel(out.exit_lambda, ref[f"gate_lambda_{i}"], 1e-6)
        assert_rel(out.exit_pdf, ref[f"exit_pdf_{i}"], 1e-6)
        assert_rel(out.logits, ref[f"logits_default_{i}"])
        for q, key in ((0.5, "05"), (0.25, "025")):
            chosen = model(ids, gate_exit=GateExit.at_threshold(q))
            assert_rel(chosen.logits, ref[f"logits_threshold{key}_{i}"])
            assert torch.equal(chosen.exit_steps - 1, ref[f"exit_step_threshold{key}_{i}"])
        assert_rel(model(ids, gate_exit=GateExit.at_step(2)).logits, ref[f"logits_exit_at_step1_{i}"])
        weighted = model(ids, gate_exit=GateExit.weighted()).logits
        assert_rel(weighted, ref[f"logits_weighted_{i}"])
        # the authors' loss with labels is the shifted cross-entropy of the p-weighted logits
        loss = F.cross_entropy(weighted[0, :-1], ids[0, 1:])
        assert_rel(loss[None], ref[f"loss_labels_{i}"])
    generated = model.generate(ids, 8, stop_token_ids=[])
    assert ids[0].tolist() + generated.tokens[0] == ref[f"generate_greedy8_{i}"][0].tolist()
    assert generated.steps_used[0] == [4] * 8


@pytest.mark.parametrize("i", [0, 1])
def test_retrofit_logits_latents_and_generation_match_reference(retrofit, i):
    model, ref = retrofit
    ids, s0 = ref[f"input_ids_{i}"], ref[f"init_state_{i}"]
    with torch.no_grad():
        for k in (1, 3, 8):
            out = model(ids, num_steps=torch.tensor([k, 0]), init_state=s0)
            assert_rel(out.logits, ref[f"logits_{k}_{i}"])
            assert_rel(out.latent, ref[f"latent_{k}_{i}"])
            assert torch.equal(model(ids, num_steps=k, init_state=s0).logits, out.logits)
        assert_rel(model(ids, num_steps=3, init_state="zeros").logits, ref[f"logits_zero_3_{i}"])
    generated = model.generate(ids, 8, 3, init_state="zeros")
    assert ids[0].tolist() + generated.tokens[0] == ref[f"generate_greedy8_steps3_zero_{i}"][0].tolist()


# ---------------------------------------------------------------- recognition and loading
def test_each_fixture_is_recognised_and_described(ouro, retrofit):
    from lens.loading import checkpoint_family

    assert [checkpoint_family(p / "checkpoint").name for p in (HUGINN, RETROFIT, OURO)] == [
        "huginn",
        "retrofit",
        "ouro",
    ]
    assert checkpoint_family("tiny-arith").name == "huginn"
    o, r = ouro[0].layout, retrofit[0].layout
    assert (o.prelude, o.core, o.coda, o.adapter, o.exit_gate, o.feedback) == (0, 2, 0, False, True, "latent")
    assert (r.prelude, r.core, r.coda, r.latent_norm) == (1, 2, 1, False)
    assert o.lenses() == ("logit", "tuned") and r.lenses() == ("logit", "coda", "tuned")
    assert lens.UnrolledLayout.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    # the checkpoints' own module paths (what nnsight users write)
    assert isinstance(ouro[0].get_submodule("model.layers.1.self_attn.q_proj"), torch.nn.Linear)
    assert retrofit[0].get_submodule("transformer.core_block.0").__class__.__name__ == "PreNormBlock"


def _copy(src, dst, config=None, weights=None):
    shutil.copytree(src / "checkpoint", dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(dst / "model.safetensors"))
    return dst


def test_unknown_family_or_mismatched_weights_give_one_clear_error(tmp_path):
    huginn_cfg = json.loads((HUGINN / "checkpoint" / "config.json").read_text())
    ouro_cfg = json.loads((OURO / "checkpoint" / "config.json").read_text())
    ouro_weights = load_file(str(OURO / "checkpoint" / "model.safetensors"))
    mixed = _copy(HUGINN, tmp_path / "mixed", config=huginn_cfg, weights=ouro_weights)
    with pytest.raises(
        CheckpointError, match=r"huginn_raven.*huginn.*retrofit.*look like ouro's.*Families: huginn"
    ):
        lens.load_model(mixed)
    llama = _copy(OURO, tmp_path / "llama", config={**ouro_cfg, "model_type": "llama"})
    with pytest.raises(ConfigError, match=r"unknown model family.*'llama'.*huginn.*retrofit.*ouro"):
        lens.load_model(llama)
    retro_cfg = json.loads((RETROFIT / "checkpoint" / "config.json").read_text())
    no_theta = _copy(
        RETROFIT, tmp_path / "no_theta", config={k: v for k, v in retro_cfg.items() if k != "rope_theta"}
    )
    with pytest.raises(ConfigError, match="rope_theta"):
        lens.load_model(no_theta)
    weights = load_file(str(OURO / "checkpoint" / "model.safetensors"))
    weights.pop("model.layers.1.mlp.up_proj.weight")
    missing = _copy(OURO, tmp_path / "missing", weights=weights)
    with pytest.raises(CheckpointError, match=r"ouro family.*missing key.*model.layers.1.mlp.up_proj.weight"):
        lens.load_model(missing)
    bad_type = _copy(OURO, tmp_path / "bad_type", config={**ouro_cfg, "total_ut_steps": "four"})
    with pytest.raises(TypeError, match="total_ut_steps"):
        lens.load_model(bad_type)


@pytest.mark.parametrize("fixture", [OURO, RETROFIT])
def test_save_load_round_trip_and_bfloat16(tmp_path, fixture):
    model = lens.load_model(fixture / "checkpoint")
    again = lens.load_model(lens.save_model(model, tmp_path / "copy"))
    assert type(again) is type(model) and again.layout == model.layout
    ids = torch.randint(1, 512, (2, 6))
    kwargs = {} if model.layout.family == "ouro" else {"init_state": "zeros"}
    with torch.no_grad():
        assert torch.equal(model(ids, 3, **kwargs).logits, again(ids, 3, **kwargs).logits)
        half = lens.load_model(fixture / "checkpoint", dtype=torch.bfloat16)
        assert half.rotary.inv_freq.dtype == torch.float32
        a = model(ids, 3, **kwargs).logits.softmax(-1)
        b = half(ids, 3, **kwargs).logits.softmax(-1)
    assert (a - b).abs().max() < 0.1


# ---------------------------------------------------------------- one stream for every family
def test_ouro_stream_sites_hooks_and_refusals(ouro):
    model, ref = ouro
    ids = ref["input_ids_0"]
    seen, lambdas = [], []

    def keep(state):
        seen.append((state.site, state.iteration, state.unrolled_index))
        if state.exit_lambda is not None:
            lambdas.append(state.exit_lambda)

    with torch.no_grad():
        out = model(ids, num_steps=3, consumers=[lens.Subscription(keep, positions="last")])
    per_iteration = [(s, t) for t in (1, 2, 3) for s in ("core.0", "core.1", "latent")]
    assert [(s, t) for s, t, _ in seen] == [("embed", 0)] + per_iteration + [("final", 0)]
    assert [u for _, _, u in seen if u >= 0] == list(range(model.layout.num_unrolled(3)))
    assert torch.allclose(torch.cat(lambdas, 1), out.exit_lambda[:, -1:].transpose(1, 2).flatten(1))
    hooked = []
    model.run_with_hooks(
        ids, 2, fwd_hooks=[("model.layers.1.hook_resid_post", lambda x, hook: hooked.append(hook.iteration))]
    )
    assert hooked == [1, 2]
    with pytest.raises(InputError, match="init_state does not apply to Ouro"):
        model(ids, 2, init_state="zeros")
    with pytest.raises(InputError, match="adapter"):
        model(ids, 2, consumers=[lens.Subscription(print, sites=["adapter"])])
    with pytest.raises(InputError, match="exit gate"):
        lens.load_model(RETROFIT / "checkpoint")(ids, 2, gate_exit=GateExit.weighted())
    with pytest.raises(InputError, match="beyond"):
        model(ids, 2, gate_exit=GateExit.at_step(3))
    with pytest.raises(InputError, match="exclude each other"):
        model.generate(ids, 2, gate_exit=GateExit.weighted(), exit_criterion="gate")
    with pytest.raises(InputError, match="warm"):
        model.generate(ids, 2, warm_start=True)


def test_nnsight_reads_ouro_layers_per_iteration(ouro):
    nnsight = pytest.importorskip("nnsight")
    model, ref = ouro
    ids = ref["input_ids_1"]
    traced = nnsight.NNsight(model)
    with traced.trace(ids, num_steps=3) as tracer:
        outs = nnsight.save(list())
        for _ in tracer.iter[0:3]:
            outs.append(traced.model.layers[1].output)
    with torch.no_grad():
        trace = model(ids, num_steps=3, return_trace=["core.1"]).trace
    assert len(outs) == 3 and all(torch.equal(outs[t], trace["core.1"][t]) for t in range(3))


# ---------------------------------------------------------------- real early exit
class _BlockCalls:
    def __init__(self, model):
        self.count = 0
        self.handles = [b.register_forward_hook(self.hook) for b in model.stage("core")]

    def hook(self, *args):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _generate_all_steps_then_choose(model, prompts, new_tokens, T, threshold):
    """Reference: every token runs all T iterations; its exit step is chosen afterwards from the gate
    (first t whose cumulative exit probability reaches ``threshold``), it is decoded there, and its
    keys at deeper iterations become those of its exit iteration (as if it had stopped)."""
    layout = model.layout
    cache, step = model.new_cache(), torch.tensor(prompts)
    tokens, steps = [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(new_tokens):
        start = cache.seq_len
        with torch.no_grad():
            out = model(step, T, cache=cache, logits="none", return_trace=["latent"])
        lam = out.exit_lambda[:, -1].double()  # [B, T]
        survive = torch.cumprod(1 - lam, -1)
        cdf = 1 - survive  # cumulative exit probability after each step (no remaining-mass rule)
        assert ((cdf - threshold).abs() > 1e-4).all()  # no decision rests on rounding
        crossed = cdf >= threshold
        exit_step = torch.where(crossed.any(-1), crossed.float().argmax(-1) + 1, T)
        latents = out.trace["latent"][:, :, -1]  # [T, B, d]
        logits = torch.stack([model.head(latents[k - 1, b]) for b, k in enumerate(exit_step.tolist())])
        nxt = logits.argmax(-1)
        for b, k in enumerate(exit_step.tolist()):
            tokens[b].append(int(nxt[b]))
            steps[b].append(k)
            for t in range(k + 1, T + 1):
                for j in range(layout.core):
                    dst, src = layout.cache_index("core", t, j), layout.cache_index("core", k, j)
                    for store in (cache.keys, cache.values):
                        store[dst][b, :, start:] = store[src][b, :, start:]
        step = nxt[:, None]
    return tokens, steps


@pytest.mark.parametrize("prompts", [[[5, 9, 100, 3, 77]], [[5, 9, 100, 3, 77], [400, 2, 18, 250, 7]]])
def test_ouro_early_exit_skips_compute_and_equals_choosing_afterwards(ouro, prompts):
    model, _ = ouro
    T, threshold, new = 4, 0.3, 8
    calls = _BlockCalls(model)
    try:
        res = model.generate(
            prompts, new, T, exit_criterion="gate", exit_threshold=threshold, stop_token_ids=[]
        )
        skipped = calls.count
        calls.count = 0
        tokens, steps = _generate_all_steps_then_choose(model, prompts, new, T, threshold)
        full = calls.count
    finally:
        calls.remove()
    assert res.tokens == tokens and res.steps_used == steps
    assert any(k < T for row in steps for k in row) and any(k == T for row in steps for k in row)
    assert full == new * T * model.layout.core
    if len(prompts) == 1:  # one row: every iteration after the exit is skipped
        assert skipped == sum(steps[0]) * model.layout.core
    assert skipped < full


def test_ouro_generation_with_the_authors_exit_modes(ouro):
    """gate_exit in generation runs every iteration (as the authors' code does) and picks the readout;
    the key/value cache changes nothing (equal to re-running the whole sequence each token)."""
    model, ref = ouro
    ids = ref["input_ids_0"]
    default = model.generate(ids, 8, gate_exit=GateExit.at_threshold(1.0), stop_token_ids=[])
    assert ids[0].tolist() + default.tokens[0] == ref["generate_greedy8_0"][0].tolist()
    for mode in (GateExit.at_threshold(0.3), GateExit.weighted(), GateExit.at_step(2)):
        cached = model.generate(ids, 6, gate_exit=mode, stop_token_ids=[])
        plain = model.generate(ids, 6, gate_exit=mode, stop_token_ids=[], use_cache=False)
        assert cached.tokens == plain.tokens, mode
    assert cached.tokens == model.generate(ids, 6, 2, stop_token_ids=[]).tokens  # at_step(2) = 2 iterations


def test_exit_distribution_sums_to_one():
    lam = torch.rand(3, 5, 6)
    pdf, cdf = exit_distribution(lam)
    assert torch.allclose(pdf.sum(-1), torch.ones(3, 5)) and torch.allclose(cdf[..., -1], torch.ones(3, 5))
    assert torch.allclose(pdf[..., 1], lam[..., 1] * (1 - lam[..., 0]))


def test_released_shapes_build_on_the_meta_device_with_their_own_key_names():
    """Ouro-1.4B (its published shape) and a TinyLlama retrofit (4-8-4): parameter names are the
    checkpoints' own, sizes are the released ones."""
    with torch.device("meta"):
        ouro = lens.OuroLM(lens.OuroConfig())  # the defaults are Ouro-1.4B's
        retro = lens.RetrofitLM(
            lens.RetrofitConfig(
                n_embd=2048,
                n_heads=32,
                num_key_value_heads=4,
                intermediate_size=5632,
                vocab_size=32000,
                n_layers_in_prelude=4,
                n_layers_in_recurrent_block=8,
                n_layers_in_coda=4,
                block_size=2048,
            )
        )
    names = set(ouro.state_dict())
    assert {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.early_exit_gate.bias",
        "lm_head.weight",
    } <= names
    assert "model.layers.23.post_attention_layernorm_2.weight" in names and len(names) == 5 + 24 * 11
    assert 1.35e9 < ouro.num_parameters() < 1.5e9
    assert ouro.layout.num_unrolled(4) == 96
    assert "transformer.core_block.7.attn.Wqkv.weight" in retro.state_dict()
    assert tuple(retro.state_dict()["transformer.core_block.0.attn.Wqkv.weight"].shape) == (
        2048 + 2 * 256,
        2048,
    )
    assert "freqs_cis" not in retro.state_dict() and 0.8e9 < retro.num_parameters() < 0.9e9
