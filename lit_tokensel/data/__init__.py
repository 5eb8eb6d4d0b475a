"""SFT data: row formats, chat-template labels (assistant tokens only), collation and the DataModule."""

from lit_tokensel.data.collate import DataCollatorForSFT, pad_token_id_of
from lit_tokensel.data.datamodule import SFTDataModule
from lit_tokensel.data.errors import InvalidRowError
from lit_tokensel.data.formats import detect_format, to_messages
from lit_tokensel.data.pipeline import SplitStats
from lit_tokensel.data.templates import CHATML_TEMPLATE, has_generation_tags
from lit_tokensel.data.tokenization import (
    IGNORE_INDEX,
    TemplateNotPrefixStableError,
    TokenizedConversation,
    assistant_token_mask,
    ensure_chat_template,
    tokenize_conversation,
)

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "DataCollatorForSFT",
    "InvalidRowError",
    "SFTDataModule",
    "SplitStats",
    "TemplateNotPrefixStableError",
    "TokenizedConversation",
    "assistant_token_mask",
    "detect_format",
    "ensure_chat_template",
    "has_generation_tags",
    "pad_token_id_of",
    "to_messages",
    "tokenize_conversation",
]
