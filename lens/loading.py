"""Loading and saving recurrent-depth checkpoints: safetensors only, strict, with errors that name the culprit.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (Huginn's layout), plus optionally the tokenizer files. Names in
``EMBEDDED_MODELS`` resolve to model directories shipped inside the package.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lens.config import RecurrentDepthConfig
from lens.errors import CheckpointError, ModelNotFoundError
from lens.layers import precompute_freqs_cis
from lens.model import RecurrentDepthLM

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_MODELS = ("tiny-arith", "tiny-chains")
_WHOLE_FILE_LIMIT = 256 * 2**20  # larger weight files are fingerprinted from samples
_SAMPLE_BYTES = 2**20


def resolve_model_path(name_or_path: str | Path) -> Path:
    """An embedded model's name or a directory; anything else is an error listing the choices."""
    path = Path(name_or_path)
    if str(name_or_path) in EMBEDDED_MODELS:
        path = EMBEDDED_DIR / str(name_or_path)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"the embedded model {name_or_path!r} is not installed at {path}")
        return path
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    raise ModelNotFoundError(
        f"unknown model {str(name_or_path)!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}) "
        "and not an existing directory"
    )


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) {missing} listed in {index.name} are missing from {path}")
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds only pickle weights (.bin/.pt); looplens loads safetensors only")
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json"
    )


def weights_fingerprint(name_or_path: str | Path) -> str:
    """A short hash of a model's weight files, recorded in run manifests so that a run is never resumed
    with other weights under the same model name (a retrained checkpoint, an updated embedded model).

    Files up to 256 MiB are hashed whole; larger shards by their size and a 1 MiB sample every 256 MiB
    (the first holds the safetensors header), which any retraining or fine-tuning changes.
    """
    digest = hashlib.sha256()
    for file in _weight_files(resolve_model_path(name_or_path)):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size};".encode())
        with file.open("rb") as fh:
            if size <= _WHOLE_FILE_LIMIT:
                for block in iter(lambda: fh.read(_SAMPLE_BYTES), b""):
                    digest.update(block)
            else:
                for offset in range(0, size, _WHOLE_FILE_LIMIT):
                    fh.seek(offset)
                    digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def read_state_dict(
    path: Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory; a damaged file raises ``CheckpointError`` naming it."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in tensors:
                        raise CheckpointError(f"key {key!r} appears in more than one shard ({file.name})")
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point() and key != "freqs_cis":
                        t = t.to(dtype)
                    tensors[key] = t.to(device) if device is not None else t
        except SafetensorError as err:
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
        except OSError as err:
            raise CheckpointError(f"{file} could not be read: {err}") from err
    return tensors


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> RecurrentDepthLM:
    """Load a recurrent-depth model (and its tokenizer, when present) strictly by parameter name.

    Example:
        >>> import lens
        >>> model = lens.load_model("tiny-arith")  # doctest: +SKIP
    """
    path = resolve_model_path(name_or_path)
    config = RecurrentDepthConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = RecurrentDepthLM(config)
    state = read_state_dict(path, dtype=dtype, device=device)
    expected = model.state_dict()
    tied = config.tie_embeddings
    if tied and "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"checkpoint {path} does not match its config: " + "; ".join(parts))
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"shape mismatch for {key!r}: checkpoint has {tuple(state[key].shape)}, "
                f"the config implies {tuple(ref.shape)}"
            )
    state.pop("freqs_cis")  # recomputed in float32 below, as Huginn does at construction
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    target = torch.device(device) if device is not None else model.transformer.wte.weight.device
    model.freqs_cis = precompute_freqs_cis(config.head_dim, config.block_size, config.rope_base).to(target)
    model.eval()
    if (path / "tokenizer.json").is_file():
        from lens.tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_dir(path)
    return model


def save_model(model: RecurrentDepthLM, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) that ``load_model`` reads back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json(directory / "config.json")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "writer": "looplens"})
    tmp.replace(directory / "model.safetensors")
    if model.tokenizer is not None:
        model.tokenizer.save(directory)
    return directory
