"""The synthetic models' tokenizer: GPT-2 style byte-level BPE with Qwen2's pre-tokenizer and ChatML special tokens,
written both as GGUF tokenizer keys and as the HF tokenizer files."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from mtpquant.core.errors import UsageError

QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# words whose left-to-right merges make the BPE merge list (byte-level spelling: Ġ is a space, Ċ a newline)
_MERGE_WORDS = (
    "Ġt", "Ġa", "he", "in", "re", "on", "Ġthe", "er", "Ġs", "at", "Ġw", "Ġo", "en", "Ġc", "it", "is", "an", "or",
    "es", "Ġb", "ed", "Ġf", "ing", "Ġp", "ou", "Ġto", "Ġm", "Ġof", "Ġin", "Ġd", "Ġh", "Ġand", "ĠĠ", "ĠĠĠĠ", "ĊĊ",
    "ll", "Ġl", "Ġn", "Ġre", "ar", "al", "Ġe", "Ġis", "Ġy", "ion", "Ġg", "Ġu", "Ġit", "Ġfor", "Ġwh", "ro",
)


@dataclass(frozen=True)
class Tokenizer:
    """Vocabulary (byte-level spelling, id order), merges and special token ids."""

    tokens: tuple[str, ...]
    merges: tuple[tuple[str, str], ...]
    special: dict[str, int]  # content -> id

    @property
    def n_normal(self) -> int:
        return len(self.tokens) - len(self.special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in its id order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


_BYTE_CHARS = _bytes_to_unicode()


def _build() -> Tokenizer:
    tokens = list(_BYTE_CHARS.values())
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:
        left = word[0]
        for ch in word[1:]:
            if left + ch not in known:
                merges.append((left, ch))
                tokens.append(left + ch)
                known.add(left + ch)
            left += ch
    special = {}
    for s in SPECIAL_TOKENS:
        special[s] = len(tokens)
        tokens.append(s)
    return Tokenizer(tuple(tokens), tuple(merges), special)


TOKENIZER = _build()


def token_id(text: str) -> int:
    """The id of a single token of the synthetic tokenizer (a special token or a byte-level token string)."""
    if text in TOKENIZER.special:
        return TOKENIZER.special[text]
    spelled = "".join(_BYTE_CHARS[b] for b in text.encode("utf-8"))
    try:
        return TOKENIZER.tokens.index(spelled)
    except ValueError:
        raise UsageError(f"synthetic tokenizer: {text!r} is not a single token") from None


def add_gguf_tokenizer(w: gguf.GGUFWriter, n_vocab: int) -> None:
    """Add the tokenizer keys; ids from the tokenizer's size up to n_vocab become unused padding tokens."""
    tok = TOKENIZER
    tokens = list(tok.tokens) + [f"[PAD{i}]" for i in range(len(tok.tokens), n_vocab)]
    types = [gguf.TokenType.NORMAL] * tok.n_normal + [gguf.TokenType.CONTROL] * len(tok.special)
    types += [gguf.TokenType.UNUSED] * (n_vocab - len(tok.tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    w.add_eos_token_id(tok.special[EOS_TOKEN])
    w.add_pad_token_id(tok.special[PAD_TOKEN])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def tokenizer_json() -> dict:
    """tokenizer.json of the HF layout."""
    tok = TOKENIZER
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in tok.special.items()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRE_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tok.tokens[: tok.n_normal])},
                  "merges": [f"{a} {b}" for a, b in tok.merges]},
    }


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json of the HF layout."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for c, i in TOKENIZER.special.items()},
        "chat_template": CHATML_TEMPLATE,
    }
