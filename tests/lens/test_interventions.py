"""Interventions (lens.interventions) against hand-written references: a forward with a hook that edits the
tensor in place. Every kind, every family, composition, the stream and hooks reading the patched run,
prefix invariance, identity, and one clear error for each kind of bad input."""

from __future__ import annotations

import pytest
import torch

import lens
from lens.errors import InputError
from lens.interventions import Ablate, Freeze, Patch, Reinject, RowPatches, Steer, intervene
from tests.conftest import data_path

FAMILIES = ("huginn", "retrofit", "ouro")
T = 5
ATOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models run single-threaded (lens.runtime.configure_threads): two threads on a busy 2-core
    machine spin-wait and make every small forward many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.manual_seed(0)
    return lens.load_model(data_path("fixtures", f"{request.param}-tiny", "checkpoint"))


@pytest.fixture(scope="module")
def huginn():
    return lens.load_model(data_path("fixtures", "huginn-tiny", "checkpoint"))


def init(model):
    return None if model.layout.family == "ouro" else "zeros"


def ids_for(model, B=2, S=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.padded_vocab_size, (B, S), generator=g)


def run(model, ids, interventions=(), hooks=(), steps=T):
    """Logits and every traced state of one forward pass (with interventions or reference hooks)."""
    with torch.no_grad():
        if interventions:
            out = model.run_with_interventions(
                ids, interventions, steps, init_state=init(model), return_trace=True
            )
        else:
            out = model.run_with_hooks(ids, steps, init(model), fwd_hooks=list(hooks), return_trace=True)
    return out


def assert_same_run(a, b, atol=ATOL, skip=()):
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=atol)
    assert a.trace.sites() == b.trace.sites()
    for site in a.trace.sites():
        if site in skip:
            continue
        torch.testing.assert_close(a.trace[site], b.trace[site], rtol=0, atol=atol, msg=site)
    if a.exit_lambda is not None:
        torch.testing.assert_close(a.exit_lambda, b.exit_lambda, rtol=0, atol=atol)


def aliased(model, site):
    """Traced sites that hold the very tensor ``site`` is (no op between them), so a reference's in-place
    edit of ``site`` rewrites them too: a retrofit's latent is its raw last core state, Ouro's final
    state is its last latent."""
    layout = model.layout
    if site == "latent" and not layout.latent_norm:
        return [f"core.{layout.core - 1}"]
    if site == "final" and not layout.coda and not layout.norm_after_coda:
        return ["latent"]
    return []


def in_place(iterations, rows, positions, value):
    """A reference hook: ``act[rows, positions] = value`` in place at the given hook iterations."""
    r, p = torch.as_tensor(rows)[:, None], torch.as_tensor(positions)[None, :]

    def hook(act, *, hook):
        if hook.iteration in iterations:
            act[r, p] = value

    return hook


def sites_of(model):
    """One site of each kind the model has, with a hook iteration to edit it at."""
    layout = model.layout
    out = [("embed", 0), (f"core.{layout.core - 1}", 2), ("core.0", T), ("final", 0)]
    out += [("prelude.0", 0)] if layout.prelude else []
    out += [("adapter", 3)] if layout.adapter else []
    out += [(f"coda.{layout.coda - 1}", 0)] if layout.coda else []
    out += [("latent", 2)] if layout.latent_per_iteration else [("latent", 0)]
    return out


# ------------------------------------------------------------------------------------ each kind
def test_patch_equals_an_in_place_hook_at_every_kind_of_site(model):
    ids = ids_for(model)
    d = model.config.n_embd
    g = torch.Generator().manual_seed(1)
    for site, t in sites_of(model):
        value = torch.randn(1, 2, d, generator=g)
        rows, positions = [1], [2, 6]
        ours = run(model, ids, [Patch(site, t or None, positions, rows, value=value)])
        ref = run(model, ids, hooks=[(model.layout.hook_name(site), in_place({t}, rows, positions, value))])
        base = run(model, ids)
        assert_same_run(ours, ref, skip=aliased(model, site))
        assert not torch.allclose(ours.logits[1], base.logits[1]), site  # the patch did something
        torch.testing.assert_close(ours.logits[0], base.logits[0], rtol=0, atol=0)  # row 0 untouched


def test_ablations_equal_in_place_hooks(model):
    ids = ids_for(model, B=3)
    site, name = "core.0", model.layout.hook_name("core.0")
    reference = run(model, ids_for(model, B=4, seed=5)).trace["core.0"][2]  # [4, S, d] at iteration 3
    zero = run(model, ids, [Ablate(site, 3, [1, 4], kind="zero")])
    assert_same_run(zero, run(model, ids, hooks=[(name, in_place({3}, [0, 1, 2], [1, 4], 0.0))]))
    mean = run(model, ids, [Ablate(site, [2, 3], "all", kind="mean", reference=reference)])
    m = reference.reshape(-1, reference.shape[-1]).mean(0)
    assert_same_run(mean, run(model, ids, hooks=[(name, in_place({2, 3}, [0, 1, 2], list(range(7)), m))]))
    per_pos = run(model, ids, [Ablate(site, 3, [0, 5], kind="mean", reference=reference, per_position=True)])
    pm = reference.mean(0)[[0, 5]]
    assert_same_run(per_pos, run(model, ids, hooks=[(name, in_place({3}, [0, 1, 2], [0, 5], pm))]))
    resampled = run(
        model, ids, [Ablate(site, 4, [3], rows=[0, 2], kind="resample", reference=reference, seed=7)]
    )
    drawn = torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(7))
    value = reference[drawn][:, [3]]
    assert_same_run(resampled, run(model, ids, hooks=[(name, in_place({4}, [0, 2], [3], value))]))


def test_steering_over_a_range_of_iterations_equals_an_in_place_add(model):
    ids = ids_for(model)
    site = f"core.{model.layout.core - 1}"
    vector = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(2))

    def add(act, *, hook):
        if hook.iteration in (2, 3, 4):
            act[:, -1] += 0.5 * vector

    ours = run(model, ids, [Steer(site, range(2, 5), "last", vector=vector, scale=0.5)])
    assert_same_run(ours, run(model, ids, hooks=[(model.layout.hook_name(site), add)]))


def test_freeze_holds_every_recurrent_site_and_equals_a_shorter_run(model):
    ids = ids_for(model)
    t0 = 3
    layout = model.layout
    names = ([layout.hook_name("adapter")] if layout.adapter else []) + [
        layout.hook_name(f"core.{j}") for j in range(layout.core)
    ]
    names += [layout.hook_name("latent")] if layout.latent_per_iteration else []
    names += ["hook_exit_lambda"] if layout.exit_gate else []
    held = {}

    def hold(act, *, hook):
        if hook.iteration == t0 - 1:
            held[hook.name] = act.clone()
        elif hook.iteration >= t0:
            act[1] = held[hook.name][1]

    ours = run(model, ids, [Freeze(t0, rows=[1])])
    assert_same_run(ours, run(model, ids, hooks=[(n, hold) for n in names]))
    shorter = run(model, ids, steps=t0 - 1)  # the held loop reads out as t0 - 1 iterations would
    torch.testing.assert_close(ours.logits[1], shorter.logits[1], rtol=0, atol=ATOL)
    core = ours.trace[f"core.{layout.core - 1}"]
    assert all(torch.equal(core[t - 1, 1], core[t0 - 2, 1]) for t in range(t0, T + 1))
    assert not torch.equal(core[t0 - 1, 0], core[t0 - 2, 0])  # row 0 kept iterating


def test_reinjection_equals_an_adapter_recomputed_by_hand(huginn):
    model = huginn
    ids, other = ids_for(model), ids_for(model, seed=3)
    adapter = model.transformer.adapter
    d = model.config.n_embd
    with torch.no_grad():
        other_e = model(other, 1, "zeros", return_trace=["prelude.0"]).trace["prelude.0"][0]
        inj_other = other_e @ adapter.weight[:, d:].T
    state = {"x": torch.zeros(2, 7, d)}  # the zero initial state enters iteration 1

    def keep(act, *, hook):
        state["x"] = act.clone()

    def reinject(act, *, hook):
        if hook.iteration in (2, 3):
            redone = state["x"] @ adapter.weight[:, :d].T + inj_other
            act[:, [1, 4]] = redone[:, [1, 4]]

    ours = run(model, ids, [Reinject(input_ids=other, iteration=[2, 3], positions=[1, 4])])
    ref = run(model, ids, hooks=[("hook_adapter", reinject), (model.layout.hook_name("core.1"), keep)])
    assert_same_run(ours, ref, atol=1e-5)
    by_tensor = run(model, ids, [Reinject(embedded=other_e, iteration=[2, 3], positions=[1, 4])])
    assert_same_run(ours, by_tensor)
    whole = run(model, ids, [Reinject(input_ids=other)])  # every iteration, every position
    with torch.no_grad():  # the loop and the coda then read nothing of this prompt: the other one's logits
        alone = model(other, T, "zeros").logits
    torch.testing.assert_close(whole.logits, alone, rtol=0, atol=1e-5)


def test_row_patches_equal_one_patch_per_forward(model):
    ids = ids_for(model, B=1)
    site = "core.0"
    d = model.config.n_embd
    its = torch.tensor([1, 3, 3, 5])
    pos = torch.tensor([0, 2, 6, 6])
    values = torch.randn(4, d, generator=torch.Generator().manual_seed(4))
    batched = run(model, ids.expand(4, -1), [RowPatches(site, its, pos, values)])
    for i in range(4):
        single = run(model, ids, [Patch(site, int(its[i]), [int(pos[i])], value=values[i])])
        torch.testing.assert_close(batched.logits[i], single.logits[0], rtol=0, atol=1e-5)


def test_interventions_compose_in_one_forward(model):
    ids = ids_for(model)
    layout = model.layout
    d = model.config.n_embd
    g = torch.Generator().manual_seed(9)
    v1, v2 = torch.randn(d, generator=g), torch.randn(d, generator=g)
    last = f"core.{layout.core - 1}"
    ours = run(
        model,
        ids,
        [
            Patch("core.0", 2, [3], value=v1),
            Steer(last, [1, 2], "all", vector=v2),
            Ablate("final", None, [0]),
        ],
    )

    def core0(act, *, hook):
        if hook.iteration == 2:
            act[:, 3] = v1

    def steer(act, *, hook):
        if hook.iteration in (1, 2):
            act += v2

    def final(act, *, hook):
        act[:, 0] = 0

    hooks = [(layout.hook_name("core.0"), core0), (layout.hook_name(last), steer), ("hook_final", final)]
    if last == "core.0":  # one hook point, the edits in the order given
        hooks = [(layout.hook_name("core.0"), lambda a, hook: (core0(a, hook=hook), steer(a, hook=hook))[0])]
        hooks.append(("hook_final", final))
    assert_same_run(ours, run(model, ids, hooks=hooks), skip=aliased(model, "final"))


# ------------------------------------------------------------------------------------ invariants
def test_a_patch_at_iteration_t_leaves_everything_earlier_unchanged(model):
    ids = ids_for(model)
    t = 3
    value = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(3))
    base = run(model, ids)
    patched = run(model, ids, [Patch("core.0", t, "all", value=value)])
    layout = model.layout
    for site in base.trace.sites():
        if layout.is_recurrent(site):
            # iteration t's adapter runs before the patched block; everything from the block on changes
            first_changed = t if site == "adapter" else t - 1
            unchanged = slice(0, first_changed)
            assert torch.equal(base.trace[site][unchanged], patched.trace[site][unchanged]), site
            assert not torch.equal(base.trace[site][first_changed:], patched.trace[site][first_changed:]), (
                site
            )
        elif site == "embed" or site.startswith("prelude"):
            assert torch.equal(base.trace[site], patched.trace[site]), site
        else:
            assert not torch.equal(base.trace[site], patched.trace[site]), site
    # and every earlier state decodes (Logit Lens) to the same logits
    for j in range(layout.core):
        early = base.trace[f"core.{j}"][: t - 1]
        assert torch.equal(
            model.head(model.final_norm(early)),
            model.head(model.final_norm(patched.trace[f"core.{j}"][: t - 1])),
        )
    if model.layout.exit_gate:
        assert torch.equal(base.exit_lambda[..., : t - 1], patched.exit_lambda[..., : t - 1])


def test_patching_a_run_with_its_own_states_is_the_identity(model):
    ids = ids_for(model)
    base = run(model, ids)
    own = [Patch.from_trace(base.trace, site) for site in base.trace.sites()]
    assert_same_run(run(model, ids, own), base, atol=0)


def test_patch_from_another_run_maps_rows_and_positions(huginn):
    model = huginn
    ids, source_ids = ids_for(model, B=2, S=7), ids_for(model, B=1, S=9, seed=8)
    source = run(model, source_ids)
    ours = run(
        model,
        ids,
        [Patch.from_trace(source.trace, "core.1", [2, 4], positions=[5, 6], source_positions=[7, 8])],
    )
    value = {t: source.trace["core.1"][t - 1][:, [7, 8]] for t in (2, 4)}

    def ref(act, *, hook):
        if hook.iteration in value:
            act[:, [5, 6]] = value[hook.iteration]

    assert_same_run(ours, run(model, ids, hooks=[("transformer.core_block.1.hook_resid_post", ref)]))


def test_consumers_and_hooks_read_the_patched_run_and_reader_passes_are_not_patched(huginn):
    model = huginn
    ids = ids_for(model)
    value = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(6))
    patch = Patch("coda.0", None, [2], value=value)
    seen, cached = [], {}

    def reader(state):  # a consumer that runs the coda itself, as the Coda Lens does
        if state.site == "latent":
            seen.append(model.run_coda(state.tensor))

    with torch.no_grad():
        out = model.run_with_interventions(
            ids,
            [patch],
            T,
            init_state="zeros",
            consumers=[lens.Subscription(reader, sites=["latent", "coda.0"])],
            fwd_hooks=[
                ("transformer.coda.0.hook_resid_post", lambda a, hook: cached.__setitem__("coda", a.clone()))
            ],
            return_trace=["coda.0", "latent"],
        )
        plain_coda = model.run_coda(out.trace["latent"][0])
    assert torch.equal(out.trace["coda.0"][0][:, 2], value.expand(2, -1))  # the stream reads the patch
    assert torch.equal(cached["coda"][:, 2], value.expand(2, -1))  # hooks after the patch see it
    torch.testing.assert_close(seen[0], plain_coda, rtol=0, atol=0)  # the reader's own coda pass is untouched
    # run_with_cache inside an intervene block caches patched states
    with torch.no_grad(), intervene(model, [Patch("core.0", 2, "all", value=value)], T, batch=2, seq_len=7):
        _, cache = model.run_with_cache(
            ids, T, "zeros", names_filter="transformer.core_block.0.hook_resid_post"
        )
    assert torch.equal(cache["transformer.core_block.0.hook_resid_post"][1], value.expand(2, 7, -1))
    assert all(not h._handles for h in model.hook_dict.values())


def test_nnsight_does_the_same_patch(huginn):
    nnsight = pytest.importorskip("nnsight")
    model = huginn
    ids = ids_for(model, B=1)
    value = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(11))
    traced = nnsight.NNsight(model)
    with traced.trace(ids, num_steps=T, init_state="zeros") as tracer:
        for _ in tracer.iter[2]:  # the third call of the block: iteration 3
            traced.transformer.core_block[1].output[:, 4] = value
        logits = nnsight.save(traced.output.logits)
    ours = run(model, ids, [Patch("core.1", 3, [4], value=value)])
    torch.testing.assert_close(logits, ours.logits, rtol=0, atol=ATOL)


def test_no_intervention_no_hook(huginn):
    with torch.no_grad(), intervene(huginn, [], T, batch=1, seq_len=3):
        assert all(not h._forward_hooks for h in huginn.hook_dict.values())
    assert not huginn.hook_injection._forward_hooks


# ------------------------------------------------------------------------------------ bad input
def test_bad_interventions_raise_one_clear_error_and_leave_no_hook(model):
    ids = ids_for(model)
    d = model.config.n_embd
    v = torch.zeros(d)
    layout = model.layout
    cases = [
        (Patch("core.0", T + 1, value=v), "outside 1..5"),
        (Patch("core.0", 0, value=v), "outside 1..5"),
        (Patch(f"core.{layout.core}", 1, value=v), "does not exist"),
        (Patch("core.x", 1, value=v), "unknown site"),
        (Patch("embed", 2, value=v), "not recurrent"),
        (Patch("core.0", 1, value=torch.zeros(d + 1)), "shape"),
        (Patch("core.0", 1, value=torch.zeros(3, 2, d)), "broadcast"),
        (Patch("core.0", 1, value=torch.zeros(d, dtype=torch.float64)), "dtype"),
        (Patch("core.0", 1, value=torch.full((d,), float("nan"))), "NaN"),
        (Patch("core.0", 1, value=None), "must be a tensor"),
        (Patch("core.0", 1, [7], value=v), "outside a sequence of 7"),
        (Patch("core.0", 1, rows=[2], value=v), "outside a batch of 2"),
        (Steer("core.0", [1, 9], vector=v), "outside 1..5"),
        (Steer("core.0", vector=torch.zeros(d, dtype=torch.float16)), "dtype"),
        (Freeze(1), "2..5"),
        (Freeze(T + 1), "2..5"),
        (Ablate("core.0", 1, kind="mean"), "must be a tensor"),
        (Ablate("core.0", 1, kind="resample", reference=torch.zeros(3, 4, d)), r"\[N, 7"),
        (Ablate("core.0", 1, kind="median"), "zero"),
        (RowPatches("core.0", torch.tensor([T + 1]), torch.tensor([0]), torch.zeros(1, d)), "outside 1..5"),
        (Patch("core.0", 1, [2, -5], value=v), "twice"),
        (
            RowPatches("core.0", torch.tensor([1, 1]), torch.tensor([3, 3]), torch.zeros(2, d), rows=[1, 1]),
            "twice",
        ),
        ("not an intervention", "not an intervention"),
    ]
    if not layout.adapter:
        cases.append((Reinject(input_ids=ids), "no adapter"))
        cases.append((Patch("adapter", 1, value=v), "no adapter"))
    else:
        cases.append((Reinject(input_ids=ids[:, :3]), "length"))
        cases.append((Reinject(), "exactly one"))
    if not layout.coda:
        cases.append((Patch("coda.0", value=v), "does not exist"))
    for intervention, message in cases:
        with pytest.raises(InputError, match=message):
            model.run_with_interventions(ids, [intervention], T, init_state=init(model))
        assert all(not h._handles for h in model.hook_dict.values()), intervention


def test_the_docs_examples_run(monkeypatch):
    """Every python block of docs/interventions.md runs as written (the nnsight one included)."""
    import linecache
    import re

    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    text = (REPO / "docs" / "interventions.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        name = f"docs/interventions.md python block {i}"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # nnsight reads its source
        exec(compile(code, name, "exec"), {"__name__": "__docs__"})
