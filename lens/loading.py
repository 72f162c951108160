"""Loading and saving looped-model checkpoints: safetensors only, strict, with errors that name the culprit.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, plus optionally the tokenizer files. The family (Huginn, a
retrofitted-recurrence model, Ouro) is recognised from ``config.json`` and the weight names
(:mod:`lens.families`); every weight must match the family's module tree by name and shape. Names in
``EMBEDDED_MODELS`` resolve to model directories shipped inside the package.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lens.errors import CheckpointError, ConfigError, InputError, ModelNotFoundError
from lens.families import Family, detect_family
from lens.looped import LoopedLM

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
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for name in weight_map.values():
            # a shard is a file beside the index: a path elsewhere ("../../x", "/etc/x") is refused
            if (
                not isinstance(name, str)
                or name in ("", ".", "..")
                or Path(name).name != name
                or "\\" in name
            ):
                raise CheckpointError(
                    f"{index}: shard {name!r} is not a file name in the checkpoint directory {path}"
                )
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
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad = int((~torch.isfinite(t)).sum())
                        raise CheckpointError(
                            f"{file.name}: tensor {key!r} holds {bad} NaN/Inf value(s); a damaged or diverged "
                            "checkpoint gives meaningless lens ranks, so it is refused"
                        )
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


def weight_names(path: Path) -> list[str]:
    """The tensor names of a checkpoint directory, read from the safetensors headers (no tensor is loaded)."""
    names: list[str] = []
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names += list(f.keys())
        except SafetensorError as err:
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
        except OSError as err:
            raise CheckpointError(f"{file} could not be read: {err}") from err
    return names


def read_config(path: Path) -> dict:
    """``config.json`` of a checkpoint directory as a mapping (a clear error when absent or broken)."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return data


def checkpoint_family(name_or_path: str | Path) -> Family:
    """The family a checkpoint belongs to, from its config and weight names (nothing is loaded)."""
    path = resolve_model_path(name_or_path)
    return detect_family(read_config(path), weight_names(path), str(path))


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating dtype, or its name (``"bfloat16"``, ``"bf16"``, ``"float32"``, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InputError(
        f"dtype {dtype!r} is not a floating dtype; use one of {', '.join(DTYPES)} or a torch.dtype"
    )


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    compile: bool = False,
) -> LoopedLM:
    """Load a looped model of any family (and its tokenizer, when present) strictly by parameter name.

    ``dtype`` is a torch dtype or its name (``"bfloat16"``); ``device`` anything torch accepts.
    ``compile=True`` compiles its blocks (:meth:`lens.LoopedLM.compile_blocks`, ``torch.compile`` with the
    default backend); the first forward pass then takes the compilation time.

    Example:
        >>> import lens
        >>> model = lens.load_model("tiny-arith", dtype="float32")
        >>> model.layout.family, model.layout.describe()
        ('huginn', 'prelude 1 · core 1 × T · coda 1')
    """
    dtype = resolve_dtype(dtype)
    path = resolve_model_path(name_or_path)
    data = read_config(path)
    family = detect_family(data, weight_names(path), str(path))
    config = family.config_from_dict(data)
    with torch.device("meta"):
        model = family.model_class(config)
    state = read_state_dict(path, dtype=dtype, device=device)
    expected = model.state_dict()
    tied = model.tied_weights()
    for key, source in tied.items():
        if key not in state and source in state:
            state[key] = state[source]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        raise CheckpointError(
            f"checkpoint {path} does not match its config ({family.name} family): " + "; ".join(parts)
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"shape mismatch for {key!r}: checkpoint has {tuple(state[key].shape)}, "
                f"the config implies {tuple(ref.shape)}"
            )
    state.pop("freqs_cis", None)  # Huginn's rotary table is recomputed in float32, as Huginn does
    model.load_state_dict(state, strict=False, assign=True)
    for key, source in tied.items():
        owner, _, attr = key.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    target = torch.device(device) if device is not None else model.lm_head.weight.device
    model.reset_buffers(target)
    model.eval()
    if (path / "tokenizer.json").is_file():
        from lens.tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_dir(path)
    if compile:
        model.compile_blocks()
    return model


def save_model(model: LoopedLM, directory: str | Path) -> Path:
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
