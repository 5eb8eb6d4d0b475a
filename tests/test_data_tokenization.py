"""Assistant-only labels from the chat template: both label paths, last turn, truncation, template fallback."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_tokensel.data import (
    CHATML_TEMPLATE,
    TemplateNotPrefixStableError,
    assistant_token_mask,
    ensure_chat_template,
    has_generation_tags,
    tokenize_conversation,
)
from lit_tokensel.data.errors import RowError

Q, A = "What is 2+2?", "The answer is 4."
SINGLE = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "world"},
]
TRAILING_USER = [*SINGLE, {"role": "user", "content": "Thanks"}]

# SmolLM2-Instruct's template (no generation tags; injects a default system prompt when there is none).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def labeled_text(tokenizer, input_ids, labels) -> str:
    """Decode exactly the labeled tokens, after checking labels equal input_ids where set."""
    ids, labs = torch.tensor(input_ids), torch.tensor(labels)
    keep = labs != -100
    assert torch.equal(ids[keep], labs[keep])
    return tokenizer.decode(ids[keep])


def test_fixture_templates(chat_tokenizer, chat_tokenizer_no_tags):
    assert has_generation_tags(chat_tokenizer.chat_template)
    assert not has_generation_tags(chat_tokenizer_no_tags.chat_template)
    assert chat_tokenizer.get_vocab() == chat_tokenizer_no_tags.get_vocab()
    rendered = [
        t.apply_chat_template(MULTI, tokenize=False) for t in (chat_tokenizer, chat_tokenizer_no_tags)
    ]
    assert rendered[0] == rendered[1]


@pytest.mark.parametrize("fixture", ["chat_tokenizer", "chat_tokenizer_no_tags"])
@pytest.mark.parametrize(
    ("messages", "train_on", "expected"),
    [
        (SINGLE, "all_turns", "The answer is 4.<|im_end|>"),
        (MULTI, "all_turns", "4.<|im_end|>world<|im_end|>"),
        (MULTI, "last_turn", "world<|im_end|>"),
        (TRAILING_USER, "all_turns", "The answer is 4.<|im_end|>"),
        (TRAILING_USER, "last_turn", "The answer is 4.<|im_end|>"),
    ],
)
def test_labels_cover_assistant_content_and_end_of_turn(request, fixture, messages, train_on, expected):
    tokenizer = request.getfixturevalue(fixture)
    t = tokenize_conversation(tokenizer, messages, max_length=1024, train_on=train_on)
    assert labeled_text(tokenizer, t.input_ids, t.labels) == expected
    assert tokenizer.decode(t.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert not t.truncated and t.num_tokens == len(t.input_ids)


@pytest.mark.parametrize("train_on", ["all_turns", "last_turn"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI, TRAILING_USER, MULTI[1:] + MULTI[1:3]])
def test_generation_tags_and_prefix_rendering_give_identical_labels(
    chat_tokenizer, chat_tokenizer_no_tags, messages, train_on
):
    with_tags = assistant_token_mask(chat_tokenizer, messages, train_on)
    by_prefix = assistant_token_mask(chat_tokenizer_no_tags, messages, train_on)
    assert with_tags == by_prefix
    assert 0 < sum(with_tags[1]) < len(with_tags[1])


def test_prefix_path_on_smollm2_style_template_skips_injected_system_prompt(chat_tokenizer):
    chat_tokenizer.chat_template = SMOLLM2_TEMPLATE
    t = tokenize_conversation(chat_tokenizer, MULTI[1:], max_length=1024)
    assert "You are a helpful AI assistant" in chat_tokenizer.decode(t.input_ids)
    assert labeled_text(chat_tokenizer, t.input_ids, t.labels) == "4.<|im_end|>world<|im_end|>"


def test_template_that_is_not_prefix_stable_is_refused(chat_tokenizer):
    # Marks the final message differently, so rendering messages[:k+1] is not a prefix of the whole.
    no_tags = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chat_tokenizer.chat_template = no_tags.replace(
        "{{ '<|im_start|>assistant\n' }}",
        "{{ '<|im_start|>assistant' + (' last' if loop.last else '') + '\n' }}",
        1,
    )
    with pytest.raises(TemplateNotPrefixStableError, match="not prefix-stable"):
        tokenize_conversation(chat_tokenizer, MULTI, 1024)


def test_prefix_path_refuses_conversation_starting_with_assistant(chat_tokenizer_no_tags):
    with pytest.raises(RowError) as info:
        tokenize_conversation(chat_tokenizer_no_tags, [{"role": "assistant", "content": "Hi"}], 1024)
    assert info.value.field == "messages[0].role"


@pytest.mark.parametrize("fixture", ["chat_tokenizer", "chat_tokenizer_no_tags"])
def test_truncation_keeps_the_beginning_of_the_response(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    prompt_len = len(tokenizer.apply_chat_template(SINGLE[:1], add_generation_prompt=True)["input_ids"])
    t = tokenize_conversation(tokenizer, SINGLE, max_length=prompt_len + 3)
    assert t.truncated and len(t.input_ids) == prompt_len + 3 and t.num_tokens > prompt_len + 3
    assert t.num_label_tokens == 3
    text = labeled_text(tokenizer, t.input_ids, t.labels)
    assert A.startswith(text) and 0 < len(text) < len(A)
    assert tokenizer.decode(t.input_ids).endswith("<|im_start|>assistant\n" + text)


def test_truncation_before_the_response_leaves_no_labels(chat_tokenizer):
    prompt_len = len(chat_tokenizer.apply_chat_template(SINGLE[:1], add_generation_prompt=True)["input_ids"])
    t = tokenize_conversation(chat_tokenizer, SINGLE, max_length=prompt_len)
    assert t.truncated and t.num_label_tokens == 0 and set(t.labels) == {-100}


def test_fallback_template_is_set_on_the_tokenizer_object(tokenizer_without_template):
    assert tokenizer_without_template.chat_template is None
    assert ensure_chat_template(tokenizer_without_template) == CHATML_TEMPLATE
    assert tokenizer_without_template.chat_template == CHATML_TEMPLATE


def test_existing_template_kept_unless_overridden(chat_tokenizer_no_tags):
    original = chat_tokenizer_no_tags.chat_template
    assert ensure_chat_template(chat_tokenizer_no_tags, "{{ 'x' }}") == original
    assert ensure_chat_template(chat_tokenizer_no_tags, override=True) == CHATML_TEMPLATE
    assert chat_tokenizer_no_tags.chat_template == CHATML_TEMPLATE


def test_chatml_fallback_refused_when_tokenizer_lacks_its_tokens():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["hello world"],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    with pytest.raises(
        ValueError, match=r"default ChatML template uses <\|im_start\|>, <\|im_end\|>.*--data\.chat_template"
    ):
        ensure_chat_template(tokenizer)
    assert tokenizer.chat_template is None
    custom = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    assert ensure_chat_template(tokenizer, custom) == custom
    t = tokenize_conversation(tokenizer, SINGLE, 1024)
    assert labeled_text(tokenizer, t.input_ids, t.labels) == "The answer is 4.</s>"
