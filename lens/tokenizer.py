"""The tokenizer wrapper: a ``tokenizers`` tokenizer plus the bits of ``tokenizer_config.json`` we need.

One class serves Huginn's real byte-level BPE tokenizer and the small word-level tokenizer of the
embedded ``tiny-arith`` model, so studies never branch on the model. It reads the files a Hugging
Face checkpoint ships (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
without depending on ``transformers``, and renders chat templates the way ``transformers`` does:
a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks`` and support for the
transformers-only ``{% generation %}`` tag that Huginn's template uses.

>>> from lens.config import CONFIGS_DIR
>>> tok = Tokenizer.from_dir(CONFIGS_DIR / "huginn-0125")  # Huginn-3.5B's tokenizer, shipped with looplens
>>> tok.encode("7"), tok.decode([55])
([55], '7')
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")

__all__ = ["Tokenizer", "compile_chat_template"]


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: marks assistant text for transformers' loss masks.

    We only render, so the body is emitted unchanged.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)  # the ``generation`` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment ``transformers`` uses (sandboxed, trimmed blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def _token_content(value: Any) -> str | None:
    """A special token as written in the config files: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("content")
    return str(value) if value is not None else None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"cannot parse {file}: expected a JSON object, got {type(data).__name__}")
    return data


def _pick_template(value: Any, file: Path | str) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (we take ``default``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, Mapping)}
        if "default" in named:
            return named["default"]
        raise ValueError(
            f"{file}: chat_template is a list without a 'default' entry ({sorted(map(str, named))})"
        )
    raise ValueError(f"{file}: chat_template must be a string, got {type(value).__name__}")


class Tokenizer:
    """Text ↔ token ids, special token ids and the chat template of one model.

    Build it with :meth:`from_dir` (a checkpoint directory) or directly from a ``tokenizers``
    tokenizer (as ``studies.tiny_arith.tokenizer`` does). Special tokens are never added
    implicitly: ``encode`` adds ``bos`` only when asked, and a chat template writes its own.
    """

    def __init__(self, backend: _BackendTokenizer, config: Mapping[str, Any] | None = None) -> None:
        """Wrap ``backend``; ``config`` is a ``tokenizer_config.json`` mapping (special token strings,
        ``chat_template``, anything else is kept and written back by :meth:`save`)."""
        self.backend = backend
        self.config: dict[str, Any] = dict(config or {})
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.unk_token = _token_content(self.config.get("unk_token"))
        self.bos_token_id = self._special_id("bos_token", self.bos_token)
        self.eos_token_id = self._special_id("eos_token", self.eos_token)
        self.pad_token_id = self._special_id("pad_token", self.pad_token)
        self.unk_token_id = self._special_id("unk_token", self.unk_token)
        self.chat_template: str | None = _pick_template(self.config.get("chat_template"), CONFIG_FILE)
        self._compiled: jinja2.Template | None = None
        if self.chat_template is not None:
            try:
                self._compiled = compile_chat_template(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"the chat template does not compile: {exc}") from exc

    def _special_id(self, key: str, token: str | None) -> int | None:
        if token is None:
            return None
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise ValueError(f"{key} {token!r} is not in the vocabulary")
        return tid

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json`` when present).

        ``special_tokens_map.json`` overrides the config's special tokens, as in ``transformers``.
        Raises ``FileNotFoundError`` when ``tokenizer.json`` is missing and ``ValueError`` (naming
        the file) when a file cannot be parsed.
        """
        path = Path(path)
        if path.is_file() and path.name == TOKENIZER_FILE:
            path = path.parent
        tok_file = path / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found: a tokenizer directory needs {TOKENIZER_FILE}")
        try:
            backend = _BackendTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises a plain Exception on bad JSON
            raise ValueError(f"cannot parse {tok_file}: {exc}") from exc

        config_file = path / CONFIG_FILE
        config = _read_json(config_file) if config_file.is_file() else {}
        map_file = path / SPECIAL_TOKENS_FILE
        if map_file.is_file():
            for key, value in _read_json(map_file).items():
                if key in SPECIAL_TOKEN_KEYS and _token_content(value) is not None:
                    config[key] = _token_content(value)
        jinja_file = path / CHAT_TEMPLATE_FILE
        if config.get("chat_template") is None and jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        try:
            return cls(backend, config)
        except ValueError as exc:
            raise ValueError(f"{config_file}: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``path``.

        The config keeps every key it was loaded with; :meth:`from_dir` reads the result back.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE), pretty=True)
        config = dict(self.config)
        special: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = getattr(self, key)
            if value is None:
                config.pop(key, None)
            else:
                config[key] = special[key] = value
        if self.chat_template is None:
            config.pop("chat_template", None)
        else:
            config["chat_template"] = self.chat_template
        (path / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (path / SPECIAL_TOKENS_FILE).write_text(
            json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return path

    # ------------------------------------------------------------------ text <-> ids
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding must have at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised, none are added
        unless ``add_bos``."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int] | int | Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, a 1-D tensor or array, or one id)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry, spelled as stored (byte-level BPE writes " 7" as "Ġ7")."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` as stored, or ``None`` when out of range."""
        return self.backend.id_to_token(int(token_id))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` (``{"role", "content"}`` dicts) with the model's chat template.

        The template sees ``messages``, ``bos_token``, ``eos_token``, ``pad_token`` and
        ``add_generation_prompt`` (plus any extra keyword). With ``tokenize`` the rendered text is
        encoded without adding special tokens (the template writes its own ``bos``).
        """
        if self._compiled is None:
            raise ValueError("this tokenizer has no chat template; use a plain prompt instead")
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            **template_kwargs,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        text = self._compiled.render(**variables)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, chat_template={self.has_chat_template})"
        )
