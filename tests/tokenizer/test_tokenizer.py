"""KimiByteTokenizer: byte ids, special tokens, decode, and the Kimi K2.5 chat template."""

from __future__ import annotations

import pytest
import torch

from kimi_core.tokenizer import KimiByteTokenizer, count_tokens


@pytest.fixture()
def tok() -> KimiByteTokenizer:
    return KimiByteTokenizer()


def test_vocab_and_special_ids(tok: KimiByteTokenizer) -> None:
    assert tok.vocab_size == 266 == len(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 256 == tok.eos_token_id
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [261, 262]
    assert tok.pad_token_id == 265
    assert tok.convert_tokens_to_ids("a") == 97
    with pytest.raises(ValueError, match="unknown token"):
        tok.convert_tokens_to_ids("<|nope|>")


def test_encode_is_utf8_bytes_with_special_tokens(tok: KimiByteTokenizer) -> None:
    assert tok.encode("hi") == [104, 105]
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.encode("a</think>b") == [97, 262, 98]
    assert tok.encode("x", add_special_tokens=True) == [tok.bos_token_id, 120]
    # A partial special token is just bytes.
    assert tok.encode("<think") == list(b"<think")


def test_decode_roundtrip_and_skip(tok: KimiByteTokenizer) -> None:
    text = "Answer: \\boxed{42}</think>ok<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "Answer: \\boxed{42}ok"
    assert tok.decode(torch.tensor(ids)) == text


def test_decode_invalid_utf8_replaces(tok: KimiByteTokenizer) -> None:
    assert tok.decode([0xC3, 104]) == "\ufffdh"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([999])


def test_chat_template_user_prompt(tok: KimiByteTokenizer) -> None:
    text = tok.apply_chat_template("2+2?", tokenize=False)
    assert text == "<|im_user|>user<|im_middle|>2+2?<|im_end|><|im_assistant|>assistant<|im_middle|><think>"
    ids = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    assert ids == tok.encode(text)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_user|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<think>")


def test_chat_template_multi_turn_without_generation_prompt(tok: KimiByteTokenizer) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == (
        "<|im_system|>system<|im_middle|>S<|im_end|>"
        "<|im_user|>user<|im_middle|>U<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>A<|im_end|>"
    )


def test_chat_template_bad_messages_name_the_index(tok: KimiByteTokenizer) -> None:
    with pytest.raises(ValueError, match="message 1 is missing"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}])
    with pytest.raises(ValueError, match="message 0 has role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "a"}])


def test_count_tokens(tok: KimiByteTokenizer) -> None:
    assert count_tokens(tok, "ab</think>") == 3
