"""Byte-level tokenizer with Kimi's special tokens, shaped like a Hugging Face tokenizer.

The real Kimi tokenizer (tiktoken BPE) cannot be downloaded offline, so the CPU pipeline uses
this one: ids 0..255 are the raw UTF-8 bytes, and Kimi's special tokens follow as ids 256.. .
Production passes the real tokenizer instead; every caller must use only the methods defined
here (`encode`, `decode`, `apply_chat_template`, `convert_tokens_to_ids`, `vocab_size`,
`eos_token_id`, `pad_token_id`, `len()`), which the Hugging Face tokenizers also provide.

Chat format (Kimi K2.5, no default system prompt):
`<|im_user|>user<|im_middle|>{content}<|im_end|>` per user turn (system and assistant turns
alike with their own role token), and the generation prompt
`<|im_assistant|>assistant<|im_middle|><think>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

NUM_BYTES = 256

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<think>",
    "</think>",
    "[BOS]",
    "[EOS]",
    "[PAD]",
)

ROLE_TOKENS: dict[str, str] = {
    "system": "<|im_system|>",
    "user": "<|im_user|>",
    "assistant": "<|im_assistant|>",
}

GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|><think>"

Message = Mapping[str, str]


class KimiByteTokenizer:
    """Bytes as ids 0..255 plus Kimi's special tokens as ids 256..265.

    `eos_token_id` is `<|im_end|>` (the end of an assistant turn ends generation);
    `pad_token_id` is `[PAD]`; `bos_token_id` is `[BOS]`.
    """

    def __init__(self) -> None:
        self._special_to_id = {tok: NUM_BYTES + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        # Longest first so that no special token is shadowed by a prefix of another one.
        alternatives = sorted(SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(tok) for tok in alternatives))

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes plus the special tokens."""
        return NUM_BYTES + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self._special_to_id["<|im_end|>"]

    @property
    def eos_token(self) -> str:
        return "<|im_end|>"

    @property
    def pad_token_id(self) -> int:
        return self._special_to_id["[PAD]"]

    @property
    def pad_token(self) -> str:
        return "[PAD]"

    @property
    def bos_token_id(self) -> int:
        return self._special_to_id["[BOS]"]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    @property
    def all_special_ids(self) -> list[int]:
        return [self._special_to_id[tok] for tok in SPECIAL_TOKENS]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a special token (or of a single-byte character); a list maps elementwise."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(tok) for tok in tokens]

    def _token_to_id(self, token: str) -> int:
        if token in self._special_to_id:
            return self._special_to_id[token]
        raw = token.encode("utf-8")
        if len(raw) == 1:
            return raw[0]
        raise ValueError(
            f"unknown token {token!r}: expected one byte or one of {list(SPECIAL_TOKENS)}"
        )

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of `text`; special-token strings inside it become their single ids.

        `add_special_tokens=True` prepends `[BOS]` (the chat template never needs it).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_token_id] if add_special_tokens else []
        pos = 0
        for match in self._special_re.finditer(text):
            ids.extend(text[pos : match.start()].encode("utf-8"))
            ids.append(self._special_to_id[match.group(0)])
            pos = match.end()
        ids.extend(text[pos:].encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte runs are decoded as UTF-8 with errors="replace"."""
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        pieces: list[str] = []
        run = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < NUM_BYTES:
                run.append(token_id)
                continue
            special = self._id_to_special.get(token_id)
            if special is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special_tokens:
                pieces.append(special)
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def apply_chat_template(
        self,
        messages: str | Sequence[Message],
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = True,
        **_: object,
    ) -> list[int] | str:
        """Render a conversation in Kimi K2.5's chat format; a plain string is one user message.

        Returns token ids when `tokenize` else the rendered string. Extra keyword arguments
        that Hugging Face accepts (e.g. `return_dict`) are not supported and are ignored.
        """
        text = render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text


def render_chat(messages: str | Sequence[Message], *, add_generation_prompt: bool = True) -> str:
    """The Kimi K2.5 chat string for `messages` (see the module docstring for the format)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    parts: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be a mapping with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            raise ValueError(f"message {index} is missing 'role' or 'content': {dict(message)!r}")
        if role not in ROLE_TOKENS:
            raise ValueError(f"message {index} has role {role!r}; valid roles: {sorted(ROLE_TOKENS)}")
        if not isinstance(content, str):
            raise ValueError(f"message {index} content must be a str, got {type(content).__name__}")
        parts.append(f"{ROLE_TOKENS[role]}{role}<|im_middle|>{content}<|im_end|>")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def count_tokens(tokenizer: KimiByteTokenizer, text: str) -> int:
    """Number of ids `tokenizer` gives `text` (no special tokens added)."""
    return len(tokenizer.encode(text, add_special_tokens=False))
