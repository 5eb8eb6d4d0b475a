"""Chat templates used when a tokenizer brings none.

`CHATML_TEMPLATE` marks each assistant turn's content and its end-of-turn token with
`{% generation %}` so transformers can return an exact assistant-token mask.
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML with generation tags: labels cover assistant content plus `<|im_end|>`."""

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def has_generation_tags(template: str | None) -> bool:
    """True when a chat template marks assistant turns with `{% generation %}`."""
    return bool(template) and "{% generation %}" in template.replace("{%- generation %}", "{% generation %}")
