"""GGUF tokenizers against the original HF tokenizer of each tokenizer.ggml.pre type, and transformers' own conversion.

For each type a small byte-level BPE is trained under the rules of the family's published tokenizer.json,
written into a GGUF the way llama.cpp's converter writes one, and imported; every string must give the ids
the original gives. transformers reading the same GGUF is checked too: the strings where it differs from the
original are the reasons src/shardwise/gguf_tokenizer.py gives for not calling it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_gguf import hf_parsing_each_gguf_once, smollm2_gguf

from shardwise.io.gguf.file import GGUFError
from shardwise.io.gguf.tokenizer import tokenizer_files

gguf = pytest.importorskip("gguf", reason="the gguf package (the `hf` extra) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (the `hf` extra) is not installed")
from tokenizers import AddedToken, Tokenizer, pre_tokenizers, processors, trainers  # noqa: E402

# What decides ids in each family's published tokenizer.json, as written there.
ORIGINALS = {
    "llama-bpe": json.loads(r"""{  "_from": "meta-llama/Meta-Llama-3-8B",
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "ignore_merges": true}"""),  # noqa: E501 - verbatim
    "qwen2": json.loads(r"""{  "_from": "Qwen/Qwen2.5-0.5B-Instruct",
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "ignore_merges": false}"""),  # noqa: E501 - verbatim
    "smollm": json.loads(r"""{  "_from": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "ignore_merges": false}"""),
    "gpt-2": json.loads(r"""{  "_from": "openai-community/gpt2",
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true},
        "ignore_merges": false}"""),
}
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
# Special tokens as in each family (the first is BOS, the last EOS); Llama 3 puts BOS before every text.
CONTROL = {"llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
           "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           "smollm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "gpt-2": ["<|endoftext|>"]}
USER_DEFINED = ["<tool_call>", "</tool_call>"]  # added tokens that are not special, as Qwen2.5 and many fine-tunes have
UNMERGED = " Việt"  # in the vocabulary, not reached by the merges: one token only under ignore_merges (llama.cpp #7193)

DIGITS = "12345 3.14159 2024-11-22"
SPACES = "a   b\n\n\tc"
CONTRACTIONS = "I'M don't WE'LL"
UNICODE = "café naïve 日本語 🤗"
CODE = "def area(r):\n    if r < 0:\n        raise ValueError('r')\n    return 3.14 * r ** 2\n"
SPACED_NUMBERS = "Total:  42, x  = 7"
DECOMPOSED = "cafe\u0301 nai\u0308ve"
VIET = "Tiếng Việt"
ADDED = '<|im_start|>user\n<tool_call>{"n": 1}</tool_call><|im_end|> <|endoftext|>'
STRINGS = [DIGITS, SPACES, CONTRACTIONS, UNICODE, CODE, SPACED_NUMBERS, DECOMPOSED, VIET, ADDED]
CORPUS = [DIGITS, SPACES, CONTRACTIONS, UNICODE, CODE, "The year 2024 had 366 days; I'd say we'll see 1,000 more.",
          "Don't THEY'RE it's naïveté résumé Straße 日本語のテキスト 🤗🤗",
          "    for i in range(10):\n\t\tprint(i)  # 42\n"] * 4

# Where transformers' reading of the GGUF differs from the original, and why.
TRANSFORMERS_WRONG_ON = {
    "llama-bpe": {VIET,  # no ignore_merges: " Việt" comes out in pieces
                  ADDED},  # "<|endoftext|>" is not in Llama 3's vocabulary, and it adds it as a new token
    "qwen2": {DECOMPOSED},  # no NFC normalizer
    "smollm": {SPACED_NUMBERS},  # no digit split first, so the spaces before a number do not merge
    "gpt-2": set(),
}



def write_tokenizer(meta: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    for name, text in tokenizer_files(meta).items():
        (out / name).write_text(text)

def byte_level(text: str) -> str:
    """How a byte-level vocabulary spells text: each UTF-8 byte as one printable character."""
    return "".join(piece for piece, _ in pre_tokenizers.ByteLevel(use_regex=False).pre_tokenize_str(text))


def original(pre: str, vocab: dict[str, int], merges: list[str], control: list[str], path: Path):
    """The HF tokenizer such a model ships: the family's rules, this vocabulary, loaded by transformers."""
    rules = ORIGINALS[pre]
    tok = Tokenizer.from_str(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": rules["ignore_merges"]},
        "normalizer": rules["normalizer"], "pre_tokenizer": rules["pre_tokenizer"], "decoder": BYTE_LEVEL_DECODER}))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED if t in vocab])
    if pre == "llama-bpe":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{control[0]} $A", pair=f"{control[0]} $A {control[0]}:1 $B:1",
            special_tokens=[(control[0], vocab[control[0]])])
    tok.save(str(path))
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))


def trained(pre: str) -> tuple[dict[str, int], list[str]]:
    """A small vocabulary and merges learned under the family's rules, then its added tokens after them."""
    rules = ORIGINALS[pre]
    tok = Tokenizer.from_str(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []},
                                         "normalizer": rules["normalizer"], "pre_tokenizer": rules["pre_tokenizer"]}))
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    for token in [*CONTROL[pre], *USER_DEFINED, byte_level(UNMERGED)]:
        vocab.setdefault(token, len(vocab))
    return vocab, [" ".join(m) for m in model["merges"]]


def write_gguf(path: Path, pre: str, vocab: dict[str, int], merges: list[str]) -> None:
    """The tokenizer part of a GGUF as llama.cpp's convert_hf_to_gguf.py writes it."""
    tokens = sorted(vocab, key=vocab.__getitem__)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in CONTROL[pre] else 4 if t in USER_DEFINED else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[CONTROL[pre][0]])
    w.add_eos_token_id(vocab[CONTROL[pre][-1]])
    w.add_add_bos_token(pre == "llama-bpe")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_meta(path: Path) -> dict[str, object]:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("pre", ORIGINALS)
def test_imported_tokenizer_matches_the_original(pre, tmp_path):
    vocab, merges = trained(pre)
    write_gguf(tmp_path / "m.gguf", pre, vocab, merges)
    write_tokenizer(gguf_meta(tmp_path / "m.gguf"), tmp_path / "ours")
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    ref = original(pre, vocab, merges, CONTROL[pre], tmp_path / "original.json")
    assert len(ours) == len(ref) == len(vocab)
    for text in STRINGS:
        assert ours(text).input_ids == ref(text).input_ids, text  # with BOS where the original adds it
        assert ours.decode(ids(ours, text)) == ref.decode(ids(ref, text))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert {text for text in STRINGS if ids(theirs, text) != ids(ref, text)} == TRANSFORMERS_WRONG_ON[pre]


def test_smollm2_matches_its_original_rules_where_transformers_does_not(tmp_path):
    src = smollm2_gguf()
    with hf_parsing_each_gguf_once():  # the file's metadata, parsed once for this test and for transformers
        meta = gguf_meta(src)
        theirs = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    write_tokenizer(meta, tmp_path)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    ref = original("smollm", {t: i for i, t in enumerate(tokens)}, meta["tokenizer.ggml.merges"],
                   [t for t, kind in zip(tokens, types) if kind == 3], tmp_path / "original.json")
    for text in STRINGS:
        assert ids(ours, text) == ids(ref, text), text
    assert {text for text in STRINGS if ids(theirs, text) != ids(ref, text)} == {SPACED_NUMBERS}


def valid_meta() -> dict[str, object]:
    """A byte-level vocabulary with one merge, as llama.cpp would write it."""
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "ab", "<|end|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 257 + [3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 257, "tokenizer.ggml.eos_token_id": 257}


@pytest.mark.parametrize("pre, message", [
    ("mystery-bpe", r"tokenizer\.ggml\.pre 'mystery-bpe' is not supported \(supported: .*llama-bpe.*\)"),
    ("default", r"tokenizer\.ggml\.pre 'default' is not supported"),  # llama.cpp's fallback split: no model's
    (None, r"tokenizer\.ggml\.pre is missing"),
])
def test_unknown_or_missing_pre_tokenizer_is_refused(pre, message, tmp_path):
    meta = valid_meta()
    meta["tokenizer.ggml.pre"] = pre
    with pytest.raises(GGUFError, match=message):
        write_tokenizer({k: v for k, v in meta.items() if v is not None}, tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer.ggml.tokens", None, r"tokenizer\.ggml\.tokens is missing; expected a list of str"),
    ("tokenizer.ggml.tokens", "abc", r"tokenizer\.ggml\.tokens is str 'abc'; expected a list of str"),
    ("tokenizer.ggml.tokens", ["a", 7], r"tokenizer\.ggml\.tokens\[1\] is int 7; expected a list of str"),
    ("tokenizer.ggml.tokens", ["a", "b", "a"], r"tokenizer\.ggml\.tokens repeats 'a' \(ids 0 and 2\)"),
    ("tokenizer.ggml.token_type", [1] * 10, r"tokenizer\.ggml\.token_type has 10 entries; expected one per token"),
    ("tokenizer.ggml.token_type", ["3"] * 258, r"tokenizer\.ggml\.token_type\[0\] is str '3'; expected a list of int"),
    ("tokenizer.ggml.merges", ["ab"], r"tokenizer\.ggml\.merges\[0\] is 'ab'; expected two tokens separated by one"),
    ("tokenizer.ggml.merges", ["a c"], r"tokenizer\.ggml\.merges\[0\] 'a c' needs token 'ac', which is not in"),
    ("tokenizer.ggml.bos_token_id", 258, r"tokenizer\.ggml\.bos_token_id is int 258; expected a token id below 258"),
    ("tokenizer.ggml.eos_token_id", "257", r"tokenizer\.ggml\.eos_token_id is str '257'; expected a token id"),
    ("tokenizer.ggml.padding_token_id", True, r"tokenizer\.ggml\.padding_token_id is bool True; expected a token"),
    ("tokenizer.ggml.add_bos_token", 1, r"tokenizer\.ggml\.add_bos_token is int 1; expected a bool"),
    ("tokenizer.chat_template", ["{{ x }}"], r"tokenizer\.chat_template is list \['\{\{ x \}\}'\]; expected a string"),
])
def test_malformed_tokenizer_metadata_names_the_key(key, value, message, tmp_path):
    meta = valid_meta()
    meta[key] = value
    with pytest.raises(GGUFError, match=message):
        write_tokenizer({k: v for k, v in meta.items() if v is not None}, tmp_path)
