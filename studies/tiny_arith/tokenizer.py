"""The embedded ``tiny-arith`` model's tokenizer: 128 fixed entries in Huginn's ``tokenizer.json`` format.

Layout (ids never change; the vocabulary is a fixed list, not learned from data):

- ids 32..126 are the printable ASCII characters and id 10 is ``"\\n"``, so a character's id is its
  ASCII code, as for Huginn's single-character tokens ('0'..'9' = 48..57, '-' = 45);
- the 32 other ids below 128 hold what the arithmetic formats need as single tokens: the special
  tokens, every digit with a leading space (" 3"), operators and parentheses with a leading space
  (" -", " ("), and the fixed words ("Question", "Answer", " What", " is", " plus", " minus",
  " times", and " the" as the reference study's control token), plus three reserved specials.

A regex pre-tokenizer isolates newlines, a digit with an optional leading space, the fixed words,
an operator with a leading space, and otherwise single characters; the decoder concatenates tokens
without inserting spaces. Hence every digit and the minus sign are single tokens with and without
a leading space, and any ASCII text round-trips exactly (other characters become ``<|unk|>``).

    python -m studies.tiny_arith.tokenizer OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from lens.tokenizer import Tokenizer

PAD, BOS, EOS, UNK = "<|pad|>", "<|begin_text|>", "<|end_text|>", "<|unk|>"
RESERVED = ("<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, *RESERVED)

SPACED_OPERATORS: tuple[str, ...] = (" -", " +", " *", " (", " )", " =")
SPACED_DIGITS: tuple[str, ...] = tuple(f" {d}" for d in range(10))
LINE_WORDS: tuple[str, ...] = ("Question", "Answer")  # start a line: no leading space
SPACED_WORDS: tuple[str, ...] = (" What", " is", " plus", " minus", " times", " the")

# Ids 0..31 except 10 ("\n") and id 127 (DEL): the 32 non-character slots, in this order, so that
# pad/bos/eos/unk = 0/1/2/3, " -" " +" " *" " (" " )" " =" = 4..9, " 0".." 9" = 11..20, the words 21..28.
_SLOTS = [i for i in range(32) if i != 10] + [127]
_NON_ASCII_TOKENS: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    UNK,
    *SPACED_OPERATORS,
    *SPACED_DIGITS,
    *LINE_WORDS,
    *SPACED_WORDS,
    " /",
    *RESERVED,
)
assert len(_NON_ASCII_TOKENS) == len(_SLOTS), (len(_NON_ASCII_TOKENS), len(_SLOTS))

PRETOKENIZE_PATTERN = (
    r"\n"
    r"| ?[0-9]"
    rf"|(?<![A-Za-z])(?:{'|'.join(LINE_WORDS)})(?![A-Za-z])"
    rf"| (?:{'|'.join(w.strip() for w in SPACED_WORDS)})(?![A-Za-z])"
    r"| [-+*()=/]"
    r"|."
)
"""Pieces: a newline; a digit with an optional space; a fixed word; a spaced operator; one character."""


def vocabulary() -> dict[str, int]:
    """Token → id, 128 entries (see the module docstring for the layout)."""
    vocab = {token: i for token, i in zip(_NON_ASCII_TOKENS, _SLOTS, strict=True)}
    vocab["\n"] = 10
    vocab.update({chr(i): i for i in range(32, 127)})
    assert sorted(vocab.values()) == list(range(128))
    return vocab


def build_tokenizer() -> Tokenizer:
    """The ``tiny-arith`` tokenizer; the same ids on every build."""
    backend = BackendTokenizer(models.WordLevel(vocabulary(), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # like Huginn's: a transformers user asking for special tokens gets <|begin_text|> first
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
    }
    return Tokenizer(backend, config)


def main(argv: list[str] | None = None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to OUT_DIR."""
    parser = argparse.ArgumentParser(prog="python -m studies.tiny_arith.tokenizer", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    tok = build_tokenizer()
    path = tok.save(args.out_dir)
    print(f"wrote the tiny-arith tokenizer ({tok.vocab_size} tokens) to {path}")


if __name__ == "__main__":
    main()
