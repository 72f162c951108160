"""lens.tokenizer: Huginn's real tokenizer and chat template, file errors, save/load, the generation tag."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from lens.tokenizer import Tokenizer
from tests.conftest import HUGINN_0125, REFERENCE

SYSTEM = "You are a concise and helpful assistant. Always return only the final answer straightway."

# The reference study's 4-shot prompt for the first evaluated row of its filtered set, written out from
# the template's logic: bos, then per message "<|begin_header|>ROLE<|end_header|>\n\n" + content|trim +
# "<|end_turn|>" (the Huginn role is rendered "Huginn"), then the generation prompt.
EXPECTED_PROMPT = (
    "<|begin_text|>"
    "<|begin_header|>system<|end_header|>\n\n"
    "You are a concise and helpful assistant. Always return only the final answer straightway.<|end_turn|>"
    "<|begin_header|>user<|end_header|>\n\nQuestion: What is (5 + 1) + 1?\nAnswer:<|end_turn|>"
    "<|begin_header|>Huginn<|end_header|>\n\n7<|end_turn|>"
    "<|begin_header|>user<|end_header|>\n\nQuestion: What is (2 + 5) - 1?\nAnswer:<|end_turn|>"
    "<|begin_header|>Huginn<|end_header|>\n\n6<|end_turn|>"
    "<|begin_header|>user<|end_header|>\n\nQuestion: What is (6 - 4) + 5?\nAnswer:<|end_turn|>"
    "<|begin_header|>Huginn<|end_header|>\n\n7<|end_turn|>"
    "<|begin_header|>user<|end_header|>\n\nQuestion: What is (2 + 4) - 1?\nAnswer:<|end_turn|>"
    "<|begin_header|>Huginn<|end_header|>\n\n5<|end_turn|>"
    "<|begin_header|>user<|end_header|>\n\nQuestion: What is (3 * 2) + 1?\nAnswer:<|end_turn|>"
    "<|begin_header|>Huginn<|end_header|>\n\n"
)


@pytest.fixture(scope="module")
def huginn() -> Tokenizer:
    return Tokenizer.from_dir(HUGINN_0125)


@pytest.fixture(scope="module")
def reference_rows() -> list[dict]:
    path = REFERENCE / "filtered_arithmetic_dataset.json"
    return json.loads(path.read_text())


def reference_messages(rows: list[dict], question: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for row in rows[:4]:
        messages.append({"role": "user", "content": row["context"]})
        messages.append({"role": "Huginn", "content": row["completion"].strip()})
    messages.append({"role": "user", "content": question})
    return messages


def test_huginn_special_tokens_and_sizes(huginn: Tokenizer) -> None:
    assert (huginn.bos_token_id, huginn.eos_token_id, huginn.pad_token_id) == (65504, 65505, 65509)
    assert (huginn.bos_token, huginn.eos_token, huginn.pad_token) == (
        "<|begin_text|>",
        "<|end_text|>",
        "<|pad|>",
    )
    assert huginn.vocab_size == 65536 and huginn.has_chat_template
    assert huginn.token_to_id("<|begin_header|>") == 65506 and huginn.id_to_token(65508) == "<|end_turn|>"
    assert huginn.id_to_token(10**6) is None and huginn.token_to_id("no such token") is None


def test_huginn_digits_are_ascii_single_tokens(huginn: Tokenizer) -> None:
    for d in range(10):
        assert huginn.encode(str(d)) == [48 + d]
        spaced = huginn.encode(f" {d}")
        assert len(spaced) == 1 and huginn.decode(spaced) == f" {d}"
    assert huginn.encode("-") == [45]
    assert len(huginn.encode(" -")) == 1
    assert huginn.encode(" -4") == huginn.encode(" -") + [52]  # a negative answer: " -" then the digit
    assert huginn.encode("<|end_header|>\n\n7")[-1] == 55  # the bare chat answer after the header


def test_huginn_encode_adds_nothing_unless_asked(huginn: Tokenizer) -> None:
    ids = huginn.encode("Question: What is 98 plus 45?\nAnswer:")
    assert huginn.bos_token_id not in ids
    assert huginn.encode("Question", add_bos=True) == [65504, *huginn.encode("Question")]


def test_reference_chat_prompt_renders_and_round_trips(huginn: Tokenizer, reference_rows: list[dict]) -> None:
    question = reference_rows[4]["context"]
    assert question == "Question: What is (3 * 2) + 1?\nAnswer:"
    messages = reference_messages(reference_rows, question)
    text = huginn.apply_chat_template(messages, add_generation_prompt=True)
    assert text == EXPECTED_PROMPT
    ids = huginn.encode(text)
    assert ids[0] == 65504 and ids.count(65504) == 1
    assert huginn.decode(ids) == text
    assert huginn.apply_chat_template(messages, tokenize=True) == ids
    assert huginn.decode(ids, skip_special_tokens=True).startswith("system\n\nYou are a concise")
    # every answer written in the worked examples is one token, the digit's ASCII code
    for row in reference_rows[:4]:
        answer = row["completion"].strip()
        assert huginn.encode("<|end_header|>\n\n" + answer)[-1] == ord(answer)


def test_chat_prompt_without_generation_prompt_ends_the_text(
    huginn: Tokenizer, reference_rows: list[dict]
) -> None:
    messages = reference_messages(reference_rows, reference_rows[5]["context"])
    text = huginn.apply_chat_template(messages, add_generation_prompt=False)
    assert text.endswith("Question: What is (6 - 5) * 3?\nAnswer:<|end_turn|><|end_text|>")
    # "assistant" renders like "Huginn"; contents are trimmed
    alt = [{**m, "role": "assistant"} if m["role"] == "Huginn" else m for m in messages]
    alt[1] = {"role": "user", "content": "  " + alt[1]["content"] + "\n"}
    assert huginn.apply_chat_template(alt, add_generation_prompt=False) == text


def test_save_and_reload(huginn: Tokenizer, tmp_path) -> None:
    out = huginn.save(tmp_path / "tok")
    assert {p.name for p in out.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    again = Tokenizer.from_dir(out)
    text = "Question: What is (3 * 2) + 1?\nAnswer: 7<|end_turn|>"
    assert again.encode(text) == huginn.encode(text)
    assert again.chat_template == huginn.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (65504, 65505, 65509)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # unknown keys are kept


def test_missing_and_broken_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def _word_level(tmp_path, config: dict | str | None) -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "a", "b"])}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "tokenizer_config.json").write_text(text)
    return Tokenizer.from_dir(tmp_path)


def test_broken_config_names_the_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        _word_level(tmp_path, "{ broken")
    with pytest.raises(ValueError, match="tokenizer_config.json.*not in the vocabulary"):
        _word_level(tmp_path, {"bos_token": "<nope>"})
    with pytest.raises(ValueError, match="chat template does not compile"):
        _word_level(tmp_path, {"chat_template": "{% for m in messages %}"})


def test_generation_tag_and_plain_tokenizer(tmp_path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    tok = _word_level(
        tmp_path, {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": template}
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, None)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(msgs) == "<s>a[b]>"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<s>a[b]"
    # special_tokens_map.json overrides the config, as in transformers
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "</s>"}}))
    assert Tokenizer.from_dir(tmp_path).pad_token_id == 1

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "tokenizer.json", bare / "tokenizer.json")
    plain = Tokenizer.from_dir(bare)
    assert not plain.has_chat_template and plain.bos_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="bos_token"):
        plain.encode("a", add_bos=True)
