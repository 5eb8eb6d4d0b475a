"""Small models and tokenizers built locally, so quickstarts and tests need no download."""

from lit_tokensel.builtin.tokenizer import build_chat_tokenizer

__all__ = ["build_chat_tokenizer"]
