"""Train a tiny byte-level BPE chat tokenizer in well under a second."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_tokensel.data.templates import CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE


def build_chat_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    chat_template: str | None = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, wrapped for transformers, with a ChatML template.

    Byte-level means every string is encodable, whatever the corpus held. Deterministic for a
    given corpus and vocabulary size. `chat_template=None` gives a tokenizer without a template
    (what many base models look like), for testing the fallback path.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
