"""Weights from the data: validation, the span-to-token rule, the collated batch, and their effect on the loss."""

from __future__ import annotations

import json

import pytest
import torch

from lit_tokensel import FullSFT
from lit_tokensel.data.errors import InvalidRowError
from lit_tokensel.inspection import inspect_selection

PROMPT = {"role": "user", "content": "Say hello."}


def _row(**assistant) -> dict:
    return {"messages": [PROMPT, {"role": "assistant", "content": "hello world", **assistant}]}


def _sample_weights(dm, row: int = 0) -> tuple[list[str], list[float]]:
    """The trained tokens of a sample (as text) and their data weights, from a collated batch."""
    batch = dm.train_collator([dm.train_dataset[row]])
    valid = batch["labels"][0, 1:] != -100
    tokens = dm.tokenizer.convert_ids_to_tokens(batch["labels"][0, 1:][valid].tolist())
    return tokens, batch["token_weights"][0][valid].tolist()


@pytest.mark.parametrize("tags", [True, False], ids=["generation-tags", "prefix-rendering"])
def test_span_weights_land_on_the_tokens_whose_characters_they_cover(
    make_sft_datamodule, chat_tokenizer, chat_tokenizer_no_tags, tags
):
    # "hello world" tokenizes as he | l | lo | " world" | <|im_end|> (characters 0-2, 2-3, 3-5, 5-11, then the
    # end of turn). [4, 8) cuts "lo" (3-5) and " world" (5-11) in two: both straddle a span edge.
    tokenizer = chat_tokenizer if tags else chat_tokenizer_no_tags
    rows = [
        _row(weights=[[4, 8, 0.0]]),  # a 0 span: every token touching it is excluded
        _row(weights=[[4, 8, 3.0]]),  # straddling tokens take the smaller side: 1
        _row(weights=[[2, 5, 2.0]]),  # a span on token edges: exactly "l" and "lo"
        _row(weight=0.5, weights=[[0, 2, 4.0]]),  # message weight times span weight; end of turn: 0.5
        _row(),  # no weights: 1 everywhere
    ]
    dm = make_sft_datamodule(rows, tokenizer, batch_size=5)
    tokens, _ = _sample_weights(dm, 0)
    assert tokens == ["he", "l", "lo", "Ġworld", "<|im_end|>"]
    assert _sample_weights(dm, 0)[1] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert _sample_weights(dm, 1)[1] == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert _sample_weights(dm, 2)[1] == [1.0, 2.0, 2.0, 1.0, 1.0]
    assert _sample_weights(dm, 3)[1] == [2.0, 0.5, 0.5, 0.5, 0.5]
    assert _sample_weights(dm, 4)[1] == [1.0] * 5


def test_message_weight_zero_excludes_the_turn_and_its_end_of_turn_token(make_sft_datamodule, chat_tokenizer):
    row = {
        "messages": [
            PROMPT,
            {"role": "assistant", "content": "hello", "weight": 0},
            {"role": "user", "content": "Add the numbers."},
            {"role": "assistant", "content": "The answer is 4.", "weight": 1.5},
        ]
    }
    dm = make_sft_datamodule([row], chat_tokenizer)
    tokens, weights = _sample_weights(dm)
    first_end = tokens.index("<|im_end|>")
    assert weights[: first_end + 1] == [0.0] * (first_end + 1)
    assert weights[first_end + 1 :] == [1.5] * (len(tokens) - first_end - 1)
    assert tokens[-1] == "<|im_end|>"


def test_a_system_prompt_inserted_in_front_keeps_weights_on_their_message(
    make_sft_datamodule, chat_tokenizer
):
    dm = make_sft_datamodule([_row(weights=[[2, 5, 2.0]])], chat_tokenizer, system_prompt="You are terse.")
    assert _sample_weights(dm)[1] == [1.0, 2.0, 2.0, 1.0, 1.0]


def test_without_weights_the_batch_has_no_weight_tensor(make_sft_datamodule, chat_tokenizer):
    dm = make_sft_datamodule([_row()], chat_tokenizer)
    assert "token_weights" not in dm.train_collator([dm.train_dataset[0]])


@pytest.mark.parametrize(
    ("assistant", "field", "reason"),
    [
        ({"weight": -1}, "messages[1].weight", "finite number >= 0"),
        ({"weight": "2"}, "messages[1].weight", "expected a number"),
        ({"weight": True}, "messages[1].weight", "expected a number"),
        ({"weights": [[0, 12, 1.0]]}, "messages[1].weights[0]", "0 <= start < end <= 11"),
        ({"weights": [[3, 3, 1.0]]}, "messages[1].weights[0]", "non-empty character range"),
        (
            {"weights": [[0, 5, 1.0], [4, 8, 2.0]]},
            "messages[1].weights[1]",
            "overlaps messages\\[1\\].weights\\[0\\]",
        ),
        ({"weights": [[0, 2]]}, "messages[1].weights[0]", "expected \\[start, end, weight\\]"),
        ({"weights": [[0.5, 2, 1.0]]}, "messages[1].weights[0]", "start must be an integer"),
        ({"weights": {"0": 1}}, "messages[1].weights", "expected a list"),
    ],
)
def test_bad_weights_name_the_file_row_and_field(
    make_sft_datamodule, chat_tokenizer, tmp_path, assistant, field, reason
):
    with pytest.raises(InvalidRowError, match=reason) as info:
        make_sft_datamodule([_row(), _row(**assistant)], chat_tokenizer)
    assert (info.value.source, info.value.row, info.value.field) == (str(tmp_path / "train.jsonl"), 1, field)
    assert f"train.jsonl row 1, field '{field}'" in str(info.value)


def test_weights_on_a_user_message_are_refused(make_sft_datamodule, chat_tokenizer):
    row = {"messages": [{**PROMPT, "weight": 0}, {"role": "assistant", "content": "hello world"}]}
    with pytest.raises(InvalidRowError, match="only assistant messages") as info:
        make_sft_datamodule([row], chat_tokenizer)
    assert info.value.field == "messages[0].weight"


def test_the_loss_uses_the_data_weights_and_inspect_shows_them(make_sft_datamodule, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [_row(weight=0.5, weights=[[0, 2, 0.0]]), _row(weights=[[6, 11, 3.0]]), _row()]
    dm = make_sft_datamodule(rows, tokenizer, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    weights, valid = batch["token_weights"], batch["labels"][:, 1:] != -100
    assert (weights[valid] == 0).any() and (weights[valid] == 3.0).any() and (weights[valid] == 0.5).any()
    module = FullSFT(model=tiny_model_dir)
    module.configure_model()
    main, _ = module.objective_terms(module.select_batch(batch))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none", ignore_index=-100
    ).view(valid.shape)
    counted = valid & (weights != 0)  # a weight-0 token leaves the count too
    expected = (ce * weights)[counted].sum() / counted.sum()
    assert float(main.loss_sum / main.count) == pytest.approx(float(expected), rel=1e-5)
    assert int(main.count) == int(counted.sum()) < int(valid.sum())
    out = inspect_selection(module, dm, tmp_path / "inspect.jsonl", progress=False)
    records = {r["sample_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i, record in records.items():
        row = batch["sample_id"].tolist().index(i)
        assert record["data_weight"] == pytest.approx(weights[row][valid[row]].tolist())
        assert record["weight"] == pytest.approx(weights[row][valid[row]].tolist())
        assert record["keep"] == (weights[row][valid[row]] != 0).tolist()
