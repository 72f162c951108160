"""The Huginn authors' modeling code behind a pipe, for side-by-side timing (``bench_vs_authors``).

Run by ``benchmarks.bench_vs_authors`` in a *separate* Python environment that has the authors'
dependencies (``transformers`` 4.57.x, torch); it imports nothing from looplens, and the authors'
file is never part of this repository: its path is an argument.

    python benchmarks/authors_worker.py --modeling /path/to/recpre/raven_modeling_minimal.py --threads 1

``raven_config_minimal.py`` must lie beside the modeling file (their relative import). The worker
reads one JSON request per line on stdin and answers one JSON line on stdout:

* ``{"op": "load", "name", "checkpoint"}``: build ``RavenForCausalLM`` from a looplens-written Huginn
  checkpoint (``config.json`` + ``model.safetensors``, the same key names) in float32, eval mode;
* ``{"op": "forward", "name", "ids", "steps", "past"}``: one timed ``forward`` of ``ids`` at ``steps``
  iterations from a zero initial state; with ``past`` (prompt token ids) against their
  ``HuginnDynamicCache`` holding that prompt (prefilled once, copied untimed before each call);
* ``{"op": "generate", "name", "prompt", "new_tokens", "steps"}``: one timed ``generate_minimal``
  (greedy, fixed depth, zero initial state, no stop token).

Each answer carries ``ms`` and ``cpu_ms`` (wall and CPU time of the timed call, the CPU time of the
calling thread, which a busy machine inflates less) and what lets the caller check that both
implementations computed the same thing (the last position's logits, the generated tokens).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

_CONFIG_KEYS = (
    "n_embd", "n_heads", "block_size", "vocab_size", "tie_embeddings", "intermediate_size", "bias",
    "norm_eps", "n_layers_in_recurrent_block", "mean_recurrence", "n_layers_in_prelude",
    "n_layers_in_coda", "qk_bias", "rope_base",
)  # fmt: skip


def import_authors(modeling: Path) -> types.ModuleType:
    """Import ``raven_modeling_minimal`` as a submodule of a throwaway package (it imports its config relatively)."""
    if not modeling.is_file() or not (modeling.parent / "raven_config_minimal.py").is_file():
        raise SystemExit(
            f"{modeling}: expected raven_modeling_minimal.py with raven_config_minimal.py beside it"
        )
    package = types.ModuleType("authors_recpre")
    package.__path__ = [str(modeling.parent)]
    sys.modules["authors_recpre"] = package
    return importlib.import_module(f"authors_recpre.{modeling.stem}")


class Worker:
    def __init__(self, modeling: types.ModuleType) -> None:
        self.modeling = modeling
        self.models: dict[str, torch.nn.Module] = {}
        self.caches: dict[tuple, object] = {}

    def load(self, name: str, checkpoint: str) -> dict:
        folder = Path(checkpoint)
        data = json.loads((folder / "config.json").read_text())
        config = self.modeling.RavenConfig(
            **{k: data[k] for k in _CONFIG_KEYS if k in data},
            n_layers=data["n_layers_in_prelude"]
            + data["n_layers_in_recurrent_block"]
            + data["n_layers_in_coda"],
            padding_multiple=1,
        )
        model = self.modeling.RavenForCausalLM(config)
        state = load_file(str(folder / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
        if missing or unexpected:
            raise RuntimeError(
                f"weights do not match the authors' model: missing {missing}, unexpected {unexpected}"
            )
        if config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        self.models[name] = model.float().eval()
        return {"params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}

    def _cache(self, name: str, past: list[list[int]], steps: int):
        """Their cache holding the prompt ``past`` after a prefill at ``steps`` iterations (built once)."""
        key = (name, json.dumps(past), steps)
        if key not in self.caches:
            cache = self.modeling.HuginnDynamicCache()
            ids = torch.tensor(past)
            self.models[name](
                input_ids=ids, num_steps=steps, past_key_values=cache, use_cache=True, init_scale=0.0
            )
            self.caches[key] = cache
        return self.caches[key]

    @staticmethod
    def _copy(cache):
        """A copy that a forward pass can extend without touching the original (entries are not modified)."""
        new = type(cache)(lookup_strategy=cache.lookup_strategy)
        new._seen_tokens = cache._seen_tokens
        new.key_cache = {step: dict(entries) for step, entries in cache.key_cache.items()}
        new.value_cache = {step: dict(entries) for step, entries in cache.value_cache.items()}
        return new

    @torch.no_grad()
    def forward(
        self, name: str, ids: list[list[int]], steps: int, past: list[list[int]] | None = None
    ) -> dict:
        model = self.models[name]
        input_ids = torch.tensor(ids)
        kwargs: dict = {}
        if past is not None:
            cache = self._copy(self._cache(name, past, steps))
            position = torch.arange(len(past[0]), len(past[0]) + input_ids.shape[1])
            kwargs = {"past_key_values": cache, "use_cache": True, "cache_position": position}
        start, cpu = time.perf_counter(), time.thread_time()
        out = model(input_ids=input_ids, num_steps=steps, init_scale=0.0, **kwargs)
        ms, cpu_ms = (time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000
        return {"ms": ms, "cpu_ms": cpu_ms, "last_logits": out.logits[0, -1].tolist()}

    @torch.no_grad()
    def generate(self, name: str, prompt: list[int], new_tokens: int, steps: int) -> dict:
        from transformers import GenerationConfig

        model = self.models[name]
        config = GenerationConfig(
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        ids = torch.tensor([prompt])
        start, cpu = time.perf_counter(), time.thread_time()
        out = model.generate_minimal(ids, config, num_steps=steps, init_scale=0.0, max_new_tokens=new_tokens)
        ms, cpu_ms = (time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000
        return {"ms": ms, "cpu_ms": cpu_ms, "tokens": out[0, len(prompt) :].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modeling", type=Path, required=True, help="path of raven_modeling_minimal.py")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    worker = Worker(import_authors(args.modeling))
    print(
        json.dumps({"ready": True, "torch": torch.__version__, "transformers": _version("transformers")}),
        flush=True,
    )
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            answer = getattr(worker, op)(**request)
        except Exception as err:  # reported to the driver, which stops with the message
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
