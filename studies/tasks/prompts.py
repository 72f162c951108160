"""Prompt templates: the reference study's chat prompt for Huginn, plain prompts for other models.

The reference study asked Huginn-3.5B through its chat template: a system message, 4 worked
examples (the first rows of its filtered set) as user / ``Huginn`` turns with the bare answer
("7"), then the question, with the generation prompt. Models without a chat template get plain
text: worked examples and the question joined by blank lines, the answer continuing ``Answer:``
(" 7"). A :class:`PromptTemplate` is recorded in every run's manifest (``to_dict``), so a figure
always says how its model was asked.

>>> plain_prompt("Question: What is (1 + 2) * 3?\\nAnswer:", shots=[("Question: What is 1 plus 1?\\nAnswer:", " 2")])
'Question: What is 1 plus 1?\\nAnswer: 2\\n\\nQuestion: What is (1 + 2) * 3?\\nAnswer:'
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from studies.tasks.arithmetic import Problem, load_reference_problems

SYSTEM_MESSAGE = "You are a concise and helpful assistant. Always return only the final answer straightway."
"""The reference study's system message."""

NUM_SHOTS = 4
ASSISTANT_ROLE = (
    "Huginn"  # the role name the reference study used; Huginn's template also accepts "assistant"
)
CHAT_ANSWER_PREFIX = "\n\n"  # Huginn's generation prompt ends "<|end_header|>\n\n"; the bare answer follows

Shot = tuple[str, str] | Problem | Mapping[str, str]
"""A worked example: ``(context, completion)``, a :class:`Problem`, or a reference row dict."""


def reference_shots(k: int = NUM_SHOTS) -> list[tuple[str, str]]:
    """The reference study's worked examples: ``(context, completion)`` of its filtered set's first rows."""
    if not 0 <= k <= NUM_SHOTS:
        raise ValueError(f"the reference set has {NUM_SHOTS} worked examples, asked for {k}")
    return [(p.context, p.completion) for p in load_reference_problems()[:k]]


def _as_shot(shot: Shot) -> tuple[str, str]:
    if isinstance(shot, Problem):
        return shot.context, shot.completion
    if isinstance(shot, Mapping):
        return str(shot["context"]), str(shot["completion"])
    context, completion = shot
    return str(context), str(completion)


def _question_text(question: str | Problem) -> str:
    return question.context if isinstance(question, Problem) else question


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt.

    ``template`` must contain the ``{question}`` slot (and no other field; write literal braces as
    ``{{ }}``); it formats the question and every worked example's question. ``kind="chat"`` sends
    ``system``, the ``shots`` as user / assistant turns (answers stripped, as the reference did) and
    the question through the tokenizer's chat template with the generation prompt; ``kind="plain"``
    joins ``question + completion`` examples and the question with ``separator``.

    ``answer_prefix`` is the prompt's tail after which the model writes its answer as
    :meth:`expected_answer` spells it: ``""`` for plain prompts (the completion, leading space
    included, directly continues the prompt) and ``"\\n\\n"`` for Huginn's chat prompt (the bare
    answer follows the assistant header). Studies encode ``answer_prefix + answer`` to find the
    first answer token as the model must emit it.
    """

    name: str
    template: str = "{question}"
    kind: Literal["chat", "plain"] = "plain"
    shots: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    separator: str = "\n\n"
    assistant_role: str = ASSISTANT_ROLE
    answer_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("chat", "plain"):
            raise ValueError(
                f"prompt template {self.name!r}: kind must be 'chat' or 'plain', got {self.kind!r}"
            )
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as exc:
            raise ValueError(
                f"prompt template {self.name!r}: {self.template!r} is not a valid format string ({exc})"
            ) from exc
        if "question" not in fields:
            raise ValueError(
                f"prompt template {self.name!r}: {self.template!r} has no {{question}} slot; "
                "the question would be dropped"
            )
        if fields - {"question"}:
            raise ValueError(
                f"prompt template {self.name!r}: {self.template!r} has unknown slot(s) "
                f"{sorted(fields - {'question'})}; only {{question}} is filled "
                "(write literal braces as {{ and }})"
            )
        object.__setattr__(self, "shots", tuple(_as_shot(s) for s in self.shots))
        if self.answer_prefix is None:
            object.__setattr__(self, "answer_prefix", CHAT_ANSWER_PREFIX if self.kind == "chat" else "")

    def format_question(self, question: str | Problem) -> str:
        """The question placed in the template's slot."""
        return self.template.format(question=_question_text(question))

    def expected_answer(self, completion: str) -> str:
        """The completion as a model asked this way must write it (chat answers are bare: "7")."""
        return completion.strip() if self.kind == "chat" else completion

    def messages(self, question: str | Problem) -> list[dict[str, str]]:
        """The chat turns of a chat template (system, worked examples, question)."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for context, completion in self.shots:
            turns.append({"role": "user", "content": self.format_question(context)})
            turns.append({"role": self.assistant_role, "content": completion.strip()})
        turns.append({"role": "user", "content": self.format_question(question)})
        return turns

    def render(self, question: str | Problem, tokenizer: Any = None) -> str:
        """The prompt text for ``question`` (a context string or a :class:`Problem`).

        Chat templates need ``tokenizer`` (with a chat template); plain ones ignore it.
        """
        if self.kind == "chat":
            if tokenizer is None or not getattr(tokenizer, "has_chat_template", False):
                raise ValueError(
                    f"prompt template {self.name!r} is a chat prompt and needs a tokenizer with a "
                    "chat template; use a plain template for this model"
                )
            return tokenizer.apply_chat_template(self.messages(question), add_generation_prompt=True)
        parts = [self.format_question(context) + completion for context, completion in self.shots]
        parts.append(self.format_question(question))
        return self.separator.join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record for a run manifest."""
        return {
            "name": self.name,
            "kind": self.kind,
            "template": self.template,
            "shots": [list(s) for s in self.shots],
            "system": self.system,
            "separator": self.separator,
            "assistant_role": self.assistant_role,
            "answer_prefix": self.answer_prefix,
        }


def _shot_list(shots: int | Sequence[Shot] | None) -> list[tuple[str, str]]:
    if shots is None:
        return reference_shots()
    if isinstance(shots, int):
        return reference_shots(shots)
    return [_as_shot(s) for s in shots]


def chat_template(
    shots: int | Sequence[Shot] | None = None, system: str | None = SYSTEM_MESSAGE, name: str | None = None
) -> PromptTemplate:
    """The reference study's chat prompt: its system message and worked examples (``None``: its 4;
    an int: its first K; or given examples)."""
    shot_list = _shot_list(shots)
    return PromptTemplate(
        name or f"chat-{len(shot_list)}shot", kind="chat", shots=tuple(shot_list), system=system
    )


def plain_template(shots: int | Sequence[Shot] | None = None, name: str | None = None) -> PromptTemplate:
    """A plain few-shot prompt (``None``: the reference's 4 worked examples; an int: its first K;
    ``0`` or ``()``: the question alone; or given examples)."""
    shot_list = _shot_list(shots)
    return PromptTemplate(name or f"plain-{len(shot_list)}shot", kind="plain", shots=tuple(shot_list))


def chat_prompt(tokenizer: Any, question: str | Problem, shots: int | Sequence[Shot] | None = None) -> str:
    """The reference study's prompt for ``question``: system message, worked examples (default: the
    filtered set's first 4 rows), the question, through the tokenizer's chat template."""
    return chat_template(shots).render(question, tokenizer)


def plain_prompt(question: str | Problem, shots: int | Sequence[Shot] | None = None) -> str:
    """Worked examples (default: the reference's 4) and the question, separated by blank lines."""
    return plain_template(shots).render(question)


def resolve_template(spec: str | PromptTemplate | None, tokenizer: Any = None) -> PromptTemplate:
    """A template from a name, a custom text or ``None``.

    ``None`` picks ``"chat"`` when the tokenizer has a chat template, else ``"plain"`` (zero-shot:
    the question alone, as ``tiny-arith`` is trained). Names: ``"chat"`` (= ``"chat-4shot"``),
    ``"plain"`` (= ``"plain-0shot"``), ``"chat-Kshot"`` / ``"plain-Kshot"`` for K = 0..4; any other
    text must hold a ``{question}`` slot and becomes a zero-shot plain template named ``"custom"``.
    """
    if isinstance(spec, PromptTemplate):
        return spec
    if spec is None:
        spec = "chat" if getattr(tokenizer, "has_chat_template", False) else "plain"
    if spec == "chat":
        return chat_template(name="chat")
    if spec == "plain":
        return plain_template(0, name="plain")
    for kind, build in (("chat", chat_template), ("plain", plain_template)):
        prefix = f"{kind}-"
        if spec.startswith(prefix) and spec.endswith("shot") and spec[len(prefix) : -4].isdigit():
            return build(int(spec[len(prefix) : -4]), name=spec)
    if "{" not in spec:
        raise ValueError(
            f"unknown prompt template {spec!r}: use chat, plain, chat-Kshot, plain-Kshot "
            "or a text with a {question} slot"
        )
    return PromptTemplate("custom", template=spec)
