"""The tokenizer of a GGUF file as an HF tokenizer.json and tokenizer_config.json.

A GGUF keeps a byte-level BPE vocabulary and its merges, but how text is cut into pieces before the
merges run (the pre-tokenizer) it keeps only as a name, ``tokenizer.ggml.pre``, which llama.cpp maps
to regexes of its own. The same merges over differently cut text give other ids and nothing fails,
so each name accepted here maps to what the original HF tokenizer.json of the models carrying it does,
and any other name is refused rather than guessed.

transformers converts GGUF tokenizers too (``transformers.integrations.gguf.convert_gguf_tokenizer``),
but it is not called: for three of the types below its rules differ from the original, and for all of them
it adds a token the file lacks, as noted there and checked by tests/test_gguf_tokenizer.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from ...untrusted import is_int, shown
from .file import GGUFError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types: special tokens (<|im_end|>), plain added ones (<tool_call>)
SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
               "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}


@dataclass(frozen=True)
class Rules:
    """What an original tokenizer.json does around its BPE merges, as far as it changes the ids."""

    split: str | None = None  # Split(split, "isolated") then ByteLevel(use_regex=False); None: ByteLevel's GPT-2 regex
    digits: bool = False  # Digits(individual_digits=True) before that
    nfc: bool = False  # an NFC normalizer
    ignore_merges: bool = False  # a piece that is a whole vocabulary entry is that token, whatever the merges
    add_bos: bool = False  # what llama.cpp assumes when the file has no tokenizer.ggml.add_bos_token

    def pre_tokenizer(self):
        from tokenizers import Regex, pre_tokenizers

        steps = [pre_tokenizers.Digits(individual_digits=True)] if self.digits else []
        if self.split:
            steps.append(pre_tokenizers.Split(Regex(self.split), behavior="isolated"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=self.split is None)
        return pre_tokenizers.Sequence([*steps, byte_level])


LLAMA3 = Rules(split=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", ignore_merges=True, add_bos=True)
GPT2 = Rules()
PRE_TYPES = {
    # Meta Llama 3. transformers' split is right but it drops ignore_merges, so a word that is in the vocabulary
    # yet not reached by the merges (" Việt", llama.cpp #7193) becomes several tokens instead of one.
    "llama-bpe": LLAMA3, "llama3": LLAMA3, "llama-v3": LLAMA3,
    # Qwen2 / Qwen2.5. transformers has the split but not the NFC normalizer: "e" + combining accent gives other ids.
    "qwen2": Rules(split=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", nfc=True),
    # SmolLM (StarCoder's rules). transformers uses GPT-2's regex without the digit split first, so the spaces
    # before a number stay apart ("x  1": " ", " 1" rather than "  ", "1") and merge differently.
    "smollm": Rules(digits=True),
    # GPT-2 (llama.cpp writes "gpt-2"; "gpt2" is taken to mean the same). These are tokenizers' stock ByteLevel,
    # which transformers uses too; but its GPT2Tokenizer, behind every type here, adds "<|endoftext|>" as a new
    # special token when the vocabulary lacks it (Llama 3's does): an id past the model's embeddings.
    "gpt-2": GPT2, "gpt2": GPT2,
}


def tokenizer_files(meta: Mapping[str, object]) -> dict[str, str]:
    """tokenizer.json (vocab, merges and the original's pre-tokenizer) and tokenizer_config.json (specials, chat).

    Returned rather than written, so an import vets the tokenizer before it writes anything.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _tokens(meta)
    types = _list(meta, "tokenizer.ggml.token_type", int, [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries; expected one per token "
                        f"({len(tokens)} in tokenizer.ggml.tokens)")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta, vocab)
    rules = _rules(meta, merges)
    specials = {name: _token(meta, key, tokens) for name, key in SPECIAL_IDS.items()}
    ends = _ends(meta, rules, specials)
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise GGUFError(f"tokenizer.chat_template is {shown(template)}; expected a string")
    doc = json.loads(_backend(vocab, types, merges, rules).to_str())
    doc["post_processor"] = _post_processor(ends, vocab)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "chat_template": template,
              "model_max_length": 8192}
    return {"tokenizer.json": json.dumps(doc, ensure_ascii=False),
            "tokenizer_config.json": json.dumps({k: v for k, v in config.items() if v is not None}, indent=2)}


def _is(value: object, kind: type) -> bool:
    """isinstance, except that a bool is not an int: GGUF keeps them apart, Python does not."""
    return is_int(value) if kind is int else isinstance(value, kind)


def _list(meta: Mapping[str, object], key: str, kind: type, default: list | None = None) -> list:
    value = meta.get(key, default)
    if not isinstance(value, list):
        raise GGUFError(f"{key} is {shown(value)}; expected a list of {kind.__name__}")
    bad = next((i for i, v in enumerate(value) if not _is(v, kind)), None)
    if bad is not None:
        raise GGUFError(f"{key}[{bad}] is {shown(value[bad])}; expected a list of {kind.__name__}")
    return value


def _tokens(meta: Mapping[str, object]) -> list[str]:
    """The vocabulary. tokenizer.json maps token -> id, so a repeated token could keep only one id: refused."""
    tokens = _list(meta, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise GGUFError("tokenizer.ggml.tokens is empty; expected the vocabulary")
    first: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if first.setdefault(token, i) != i:
            raise GGUFError(f"tokenizer.ggml.tokens repeats {token!r} (ids {first[token]} and {i}); "
                            f"expected each token once")
    return tokens


def _merges(meta: Mapping[str, object], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merge pairs; BPE needs both sides and their join in the vocabulary. gguf-py writes no key for no merges."""
    merges = []
    for i, merge in enumerate(_list(meta, "tokenizer.ggml.merges", str, [])):
        pair = tuple(merge.split(" "))
        if len(pair) != 2 or not all(pair):
            raise GGUFError(f"tokenizer.ggml.merges[{i}] is {merge!r}; expected two tokens separated by one space")
        missing = next((t for t in (*pair, "".join(pair)) if t not in vocab), None)
        if missing is not None:
            raise GGUFError(f"tokenizer.ggml.merges[{i}] {merge!r} needs token {missing!r}, "
                            f"which is not in tokenizer.ggml.tokens")
        merges.append(pair)
    return merges


def _rules(meta: Mapping[str, object], merges: list) -> Rules:
    """The original's rules for tokenizer.ggml.pre.

    Files from before llama.cpp wrote the key (April 2024) lack it, and llama.cpp then uses a 'default'
    split that matches no model's tokenizer, warning that quality will suffer. Which split the model was
    trained with is unknown, so such a file is refused -- unless it has no merges: then every piece falls
    apart into single bytes whatever the split, and GPT-2's rules give the same ids as any other would.
    """
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None and not merges:
        return GPT2
    if pre is None:
        raise GGUFError("tokenizer.ggml.pre is missing, so the split the model was trained with is unknown; "
                        "expected a pre-tokenizer name (re-convert the model with a current llama.cpp)")
    if not isinstance(pre, str) or pre not in PRE_TYPES:
        raise GGUFError(f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(PRE_TYPES)})")
    return PRE_TYPES[pre]


def _token(meta: Mapping[str, object], key: str, tokens: list[str]) -> str | None:
    i = meta.get(key)
    if i is None:
        return None
    if not _is(i, int) or not 0 <= i < len(tokens):
        raise GGUFError(f"{key} is {shown(i)}; expected a token id below {len(tokens)} "
                        f"(the size of tokenizer.ggml.tokens)")
    return tokens[i]


def _ends(meta: Mapping[str, object], rules: Rules, specials: dict[str, str | None]) -> tuple[str | None, str | None]:
    """The BOS and EOS tokens to put around each text: llama.cpp's add_bos_token/add_eos_token, or its default."""
    ends = []
    for end, default in (("bos", rules.add_bos), ("eos", False)):
        key = f"tokenizer.ggml.add_{end}_token"
        add = meta.get(key, default)
        if not _is(add, bool):
            raise GGUFError(f"{key} is {shown(add)}; expected a bool")
        if add and specials[f"{end}_token"] is None:
            raise GGUFError(f"{key} is {'true' if key in meta else 'missing (true for this tokenizer.ggml.pre)'}, "
                            f"but there is no tokenizer.ggml.{end}_token_id; expected both")
        ends.append(specials[f"{end}_token"] if add else None)
    return ends[0], ends[1]


def _backend(vocab: dict[str, int], types: list[int], merges: list[tuple[str, str]], rules: Rules):
    """The tokenizers object: BPE under the original's rules, with the file's added tokens kept whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=rules.ignore_merges))
    tok.normalizer = normalizers.NFC() if rules.nfc else None
    tok.pre_tokenizer = rules.pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(vocab, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(vocab, types) if kind == USER_DEFINED])
    return tok


def _post_processor(ends: tuple[str | None, str | None], ids: dict[str, int]) -> dict | None:
    """A TemplateProcessing (as JSON: its string form cannot name a token with a colon) adding BOS/EOS.

    Llama 3's original adds <|begin_of_text|> this way, so HF's default add_special_tokens=True gives the same ids.
    """
    if ends == (None, None):
        return None
    bos, eos = ends

    def around(seq: str, type_id: int) -> list[dict]:
        pieces = [("SpecialToken", bos), ("Sequence", seq), ("SpecialToken", eos)]
        return [{kind: {"id": name, "type_id": type_id}} for kind, name in pieces if name]

    return {"type": "TemplateProcessing", "single": around("A", 0), "pair": around("A", 0) + around("B", 1),
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in ends if t}}
