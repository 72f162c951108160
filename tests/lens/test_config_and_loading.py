"""Config parsing, the real Huginn-3.5B shape on the meta device, strict loading and saving."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lens
from lens.errors import CheckpointError
from tests.conftest import HUGINN_0125, small_config


def test_huginn_config_parses_and_meta_model_matches_index():
    cfg = lens.RecurrentDepthConfig.from_json(HUGINN_0125 / "config.json")
    assert (cfg.n_embd, cfg.n_heads, cfg.head_dim, cfg.padded_vocab_size) == (5280, 55, 96, 65536)
    assert cfg.unrolled_layers(16) == 68
    with torch.device("meta"):
        model = lens.RecurrentDepthLM(cfg)
    state = model.state_dict()
    index = json.loads((HUGINN_0125 / "model.safetensors.index.json").read_text())
    assert set(state) == set(index["weight_map"])
    # every tensor stored in float32: the index's total size pins the shapes down
    assert sum(t.numel() * 4 for t in state.values()) == index["metadata"]["total_size"]
    assert 3.5e9 < model.num_parameters() < 3.6e9
    assert all(t.is_meta for t in state.values())


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(TypeError, match="n_embd"):
        lens.RecurrentDepthConfig(n_embd="64")
    with pytest.raises(ValueError, match="block_class_name"):
        lens.RecurrentDepthConfig(block_class_name="PreNormBlock")
    with pytest.raises(ValueError, match="frobnicate"):
        lens.RecurrentDepthConfig.from_dict({"n_embd": 64, "frobnicate": 1})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        lens.RecurrentDepthConfig.from_json(tmp_path)


def _saved_model(tmp_path, **overrides):
    torch.manual_seed(1)
    model = lens.RecurrentDepthLM(small_config(**overrides)).eval()
    lens.save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_save_load_roundtrip_identical_logits(tmp_path):
    model, path = _saved_model(tmp_path)
    again = lens.load_model(path)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a = model(ids, num_steps=5, init_state="zeros").logits
        b = again(ids, num_steps=5, init_state="zeros").logits
    assert torch.equal(a, b)
    assert again.lm_head.weight is again.transformer.wte.weight


def test_sharded_checkpoint_loads(tmp_path):
    model, path = _saved_model(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(path / "config.json", sharded / "config.json")
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(sharded / name))
        weight_map.update({k: name for k in ks})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    again = lens.load_model(sharded)
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids, 2, "zeros").logits, again(ids, 2, "zeros").logits)


def test_weights_fingerprint_tells_retrained_weights_apart(tmp_path, monkeypatch):
    import lens.loading as loading

    _, path = _saved_model(tmp_path)
    first = loading.weights_fingerprint(path)
    assert first == loading.weights_fingerprint(path) and len(first) == 16
    assert loading.weights_fingerprint("tiny-arith") != first
    data = bytearray((path / "model.safetensors").read_bytes())
    offset = len(data) - 3  # inside the last tensor
    data[offset] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    assert loading.weights_fingerprint(path) != first
    # large shards are sampled: a change inside a sample is seen, one between samples is not
    monkeypatch.setattr(loading, "_WHOLE_FILE_LIMIT", 4096)
    monkeypatch.setattr(loading, "_SAMPLE_BYTES", 1024)
    sampled = loading.weights_fingerprint(path)
    for position, seen in ((4096 + 10, True), (4096 + 2000, False)):
        data[position] ^= 1
        (path / "model.safetensors").write_bytes(bytes(data))
        assert (loading.weights_fingerprint(path) != sampled) is seen
        data[position] ^= 1


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    _, path = _saved_model(tmp_path)
    state = load_file(str(path / "model.safetensors"))

    def write(name, tensors):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(path / "config.json", d / "config.json")
        save_file(tensors, str(d / "model.safetensors"))
        return d

    missing = write("missing", {k: v for k, v in state.items() if k != "transformer.adapter.weight"})
    with pytest.raises(CheckpointError, match="missing key.*transformer.adapter.weight"):
        lens.load_model(missing)
    extra = write("extra", {**state, "transformer.surprise": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected key.*transformer.surprise"):
        lens.load_model(extra)
    wrong = write("wrong", {**state, "transformer.ln_f.weight": torch.ones(65)})
    with pytest.raises(CheckpointError, match="transformer.ln_f.weight.*65"):
        lens.load_model(wrong)
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lens.load_model(truncated)
    with pytest.raises(FileNotFoundError, match="unknown model 'no-such-model'"):
        lens.load_model("no-such-model")
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(path, bad_cfg)
    cfg = json.loads((bad_cfg / "config.json").read_text())
    cfg["n_heads"] = "four"
    (bad_cfg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TypeError, match="n_heads"):
        lens.load_model(bad_cfg)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(path / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        lens.load_model(no_weights)


def test_load_in_bfloat16_agrees_with_float32(tmp_path):
    _, path = _saved_model(tmp_path)
    f32 = lens.load_model(path)
    bf16 = lens.load_model(path, dtype=torch.bfloat16)
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16 and bf16.freqs_cis.dtype == torch.float32
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a = f32(ids, 4, "zeros").logits.softmax(-1)
        b = bf16(ids, 4, "zeros").logits.softmax(-1)
    assert (a - b).abs().max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_nan_weights_are_refused_at_load(tmp_path):
    """Issue #11.10: a NaN weight would make every lens report rank 1; loading refuses it, naming the tensor."""
    _, path = _saved_model(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["transformer.core_block.0.mlp.fc.weight"][3, 5] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"core_block\.0\.mlp\.fc\.weight.*NaN"):
        lens.load_model(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("rope_base", float("nan")), ("norm_eps", -1e-6), ("rope_base", 0.0), ("norm_eps", float("inf"))],
)
def test_non_finite_or_out_of_range_config_values_are_refused(tmp_path, field, value):
    _, path = _saved_model(tmp_path)
    data = json.loads((path / "config.json").read_text())
    data[field] = value
    (path / "config.json").write_text(json.dumps(data))  # json writes NaN / Infinity literals
    with pytest.raises(lens.ConfigError, match=field):
        lens.load_model(path)


def test_non_utf8_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"n_embd": "\xff"}')
    with pytest.raises(lens.ConfigError, match="config.json"):
        lens.RecurrentDepthConfig.from_json(tmp_path)


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/passwd", "sub/../../x", "..", "", 7])
def test_index_shards_outside_the_checkpoint_are_refused(tmp_path, shard):
    """A weight_map entry is a file name beside the index, never a path that leaves the checkpoint."""
    _, path = _saved_model(tmp_path)
    outside = tmp_path / "x.safetensors"
    shutil.copy(path / "model.safetensors", outside)  # a readable file is waiting outside
    state = load_file(str(path / "model.safetensors"))
    sharded = tmp_path / "ckpt" / "inner"
    sharded.mkdir()
    shutil.copy(path / "config.json", sharded / "config.json")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard for k in state}})
    )
    with pytest.raises(CheckpointError, match="not a file name in the checkpoint directory"):
        lens.load_model(sharded)
    with pytest.raises(CheckpointError, match="not a file name"):
        lens.loading.weights_fingerprint(sharded)
