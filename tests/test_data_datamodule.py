"""SFTDataModule end to end: labels per format, truncation counts, sample ids, splits, caching, Trainer use."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_tokensel.data import CHATML_TEMPLATE, SFTDataModule
from lit_tokensel.data import pipeline as pipeline_module

ANSWER = "The answer is 4.<|im_end|>"


def labeled_text(tokenizer, sample) -> str:
    """Decode exactly the labeled tokens of a dataset row or a batch row."""
    ids, labels = torch.as_tensor(sample["input_ids"]), torch.as_tensor(sample["labels"])
    keep = labels != -100
    assert torch.equal(ids[keep], labels[keep])
    return tokenizer.decode(ids[keep])


def numbered_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i}?", "completion": f"Answer {i}."} for i in range(n)]


@pytest.mark.parametrize(
    ("row", "kwargs", "expected"),
    [
        ({"prompt": "What is 2+2?", "completion": "The answer is 4."}, {}, ANSWER),
        ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "The answer is 4."}, {}, ANSWER),
        ({"instruction": "What is 2+2?", "output": "The answer is 4."}, {}, ANSWER),
        (
            {
                "messages": [
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4."},
                    {"role": "user", "content": "Say hello."},
                    {"role": "assistant", "content": "world"},
                ]
            },
            {},
            "4.<|im_end|>world<|im_end|>",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4."},
                    {"role": "user", "content": "Say hello."},
                    {"role": "assistant", "content": "world"},
                ]
            },
            {"train_on": "last_turn"},
            "world<|im_end|>",
        ),
        (
            {"prompt": "What is 2+2?", "completion": "The answer is 4."},
            {"system_prompt": "You are terse."},
            ANSWER,
        ),
    ],
    ids=["prompt_completion", "alpaca-input", "alpaca-no-input", "multi-turn", "last-turn", "system-prompt"],
)
def test_labels_per_format(make_sft_datamodule, chat_tokenizer, row, kwargs, expected):
    dm = make_sft_datamodule([row], chat_tokenizer, **kwargs)
    sample = dm.train_dataset[0]
    assert labeled_text(chat_tokenizer, sample) == expected
    assert sample["sample_id"] == 0


@pytest.mark.parametrize(
    ("row", "kwargs", "rendered_start"),
    [
        (
            {"instruction": "Add the numbers.", "input": "2 and 2", "output": "x"},
            {},
            "<|im_start|>user\nAdd the numbers.\n\n2 and 2<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            {"prompt": "What is 2+2?", "completion": "x"},
            {"system_prompt": "You are terse."},
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Own."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            {"system_prompt": "You are terse."},
            "<|im_start|>system\nOwn.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
        ),
    ],
)
def test_rendered_prompt(make_sft_datamodule, chat_tokenizer, row, kwargs, rendered_start):
    dm = make_sft_datamodule([row], chat_tokenizer, **kwargs)
    assert chat_tokenizer.decode(dm.train_dataset[0]["input_ids"]).startswith(rendered_start)


def test_truncation_keeps_partial_response_and_drops_empty_ones(make_sft_datamodule, chat_tokenizer):
    prompt_len = len(
        chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True
        )["input_ids"]
    )
    rows = [
        {"prompt": "What is 2+2?", "completion": "The answer is 4."},  # cut inside the response
        {"prompt": "What is 2+2? " * 5, "completion": "The answer is 4."},  # cut before the response
        {"prompt": "Hi", "completion": "4."},  # fits
    ]
    with pytest.warns(UserWarning, match=r"dropped samples with no response token left .*\{'train': 1\}"):
        dm = make_sft_datamodule(rows, chat_tokenizer, max_length=prompt_len + 3)
    stats = dm.stats["train"]
    assert (stats.rows_read, stats.truncated, stats.dropped_no_response, stats.samples) == (3, 2, 1, 2)
    first, last = dm.train_dataset[0], dm.train_dataset[1]
    assert (first["sample_id"], last["sample_id"]) == (0, 2)
    assert len(first["input_ids"]) == prompt_len + 3
    partial = labeled_text(chat_tokenizer, first)
    assert "The answer is 4.".startswith(partial) and 0 < len(partial) < len("The answer is 4.")
    assert labeled_text(chat_tokenizer, last) == "4.<|im_end|>"


def test_all_rows_dropped_is_an_error(make_sft_datamodule, chat_tokenizer):
    with pytest.raises(ValueError, match=r"no trainable samples .*dropped_no_response': 1"):
        make_sft_datamodule([{"prompt": "What is 2+2?", "completion": "4."}], chat_tokenizer, max_length=3)


def test_sample_id_survives_split_shuffle_and_collation(make_sft_datamodule, chat_tokenizer):
    rows = numbered_rows(20)
    dm = make_sft_datamodule(rows, chat_tokenizer, val_fraction=0.25, batch_size=3)
    seen = []
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for i, sample_id in enumerate(batch["sample_id"].tolist()):
            row = {k: v[i] for k, v in batch.items()}
            assert labeled_text(chat_tokenizer, row) == f"Answer {sample_id}.<|im_end|>"
            assert f"What is {sample_id}?" in chat_tokenizer.decode(batch["input_ids"][i])
            seen.append(sample_id)
    val_ids = [i for batch in dm.val_dataloader() for i in batch["sample_id"].tolist()]
    assert sorted(seen + val_ids) == list(range(20)) and len(val_ids) == 5
    assert seen != sorted(seen)  # shuffled
    val_row = dm.val_dataset[0]
    assert labeled_text(chat_tokenizer, val_row) == f"Answer {val_row['sample_id']}.<|im_end|>"


def test_shuffle_order_depends_on_seed_not_global_rng(make_sft_datamodule, chat_tokenizer):
    def order(global_seed: int, seed: int = 42) -> list[int]:
        L.seed_everything(global_seed)
        dm = make_sft_datamodule(numbered_rows(12), chat_tokenizer, batch_size=4, seed=seed)
        loader = dm.train_dataloader()
        ids = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
            ids += [i for batch in loader for i in batch["sample_id"].tolist()]
        return ids

    first = order(1)
    assert first == order(2)  # reproducible, whatever the global seed
    assert first[:12] != first[12:]  # a new order each epoch
    assert sorted(first[:12]) == list(range(12))
    assert first != order(1, seed=7)
    # a fresh loader (a resumed run) at epoch 1 replays epoch 1's order, not epoch 0's
    dm = make_sft_datamodule(numbered_rows(12), chat_tokenizer, batch_size=4, seed=42)
    resumed = dm.train_dataloader()
    resumed.sampler.set_epoch(1)
    assert [i for batch in resumed for i in batch["sample_id"].tolist()] == first[12:]


def test_epoch_orders_equal_a_seeded_shuffling_dataloader():
    """Same orders as `DataLoader(shuffle=True, generator=seeded)`, epoch by epoch, without its state."""
    import torch
    from torch.utils.data import DataLoader

    from lit_tokensel.data.samplers import EpochShuffleSampler

    loader = DataLoader(
        list(range(50)), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(42)
    )
    expected = [[i for batch in loader for i in batch.tolist()] for _ in range(3)]
    sampler = EpochShuffleSampler(50, seed=42)
    for epoch in (2, 0, 1):  # any epoch, in any order, as after a resume
        sampler.set_epoch(epoch)
        assert list(sampler) == expected[epoch]


def test_val_fraction_split_is_seeded_and_disjoint(make_sft_datamodule, chat_tokenizer):
    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = make_sft_datamodule(numbered_rows(20), chat_tokenizer, val_fraction=0.25, seed=seed)
        return list(dm.train_dataset["sample_id"]), list(dm.val_dataset["sample_id"])

    train, val = split(42)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split(42) == (train, val)
    assert split(0)[1] != val


def test_no_validation_data(make_sft_datamodule, chat_tokenizer):
    dm = make_sft_datamodule(numbered_rows(3), chat_tokenizer)
    assert dm.val_dataset is None and dm.val_dataloader() == [] and "val" not in dm.stats


def _arrow_files(root) -> set[str]:
    return {str(p) for p in root.rglob("*.arrow")}


def test_second_setup_hits_the_cache_and_max_length_misses_it(
    make_sft_datamodule, chat_tokenizer, tmp_path, monkeypatch
):
    calls = []
    tokenize_batch = pipeline_module._tokenize_batch
    monkeypatch.setattr(
        pipeline_module, "_tokenize_batch", lambda *a, **k: calls.append(1) or tokenize_batch(*a, **k)
    )
    cache = tmp_path / "hf_cache"
    first = make_sft_datamodule(numbered_rows(10), chat_tokenizer)
    files = _arrow_files(cache)
    assert calls and files

    calls.clear()
    second = make_sft_datamodule(
        numbered_rows(10), chat_tokenizer.__class__.from_pretrained(_save(chat_tokenizer, tmp_path / "tok"))
    )  # an equal tokenizer, a different object
    assert not calls and _arrow_files(cache) == files
    assert second.train_dataset.cache_files == first.train_dataset.cache_files
    assert list(second.train_dataset["input_ids"]) == list(first.train_dataset["input_ids"])

    third = make_sft_datamodule(numbered_rows(10), chat_tokenizer, max_length=20)
    assert calls and len(_arrow_files(cache) - files) == 1
    assert third.train_dataset.cache_files != first.train_dataset.cache_files


def _save(tokenizer, path) -> str:
    tokenizer.save_pretrained(path)
    return str(path)


def test_edited_file_is_read_again(make_sft_datamodule, chat_tokenizer):
    assert make_sft_datamodule(numbered_rows(3), chat_tokenizer).stats["train"].rows_read == 3
    assert make_sft_datamodule(numbered_rows(4), chat_tokenizer).stats["train"].rows_read == 4


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_list_and_parquet_files(chat_tokenizer, tmp_path, suffix):
    rows = numbered_rows(3)
    path = tmp_path / f"train{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    dm = SFTDataModule(train_file=str(path), tokenizer=chat_tokenizer, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert list(dm.train_dataset["sample_id"]) == [0, 1, 2]
    assert labeled_text(chat_tokenizer, dm.train_dataset[2]) == "Answer 2.<|im_end|>"


def test_dataset_name_and_val_split_via_load_dataset(write_jsonl, chat_tokenizer, tmp_path):
    # A local folder goes through the same `datasets.load_dataset(name, config, split=...)` path as a hub id.
    write_jsonl(tmp_path / "ds" / "train.jsonl", numbered_rows(4))
    write_jsonl(
        tmp_path / "ds" / "validation.jsonl",
        [{"prompt": "Q", "completion": "v"}, {"prompt": "Q", "completion": " "}],
    )
    dm = SFTDataModule(
        dataset_name=str(tmp_path / "ds"),
        val_split="validation",
        tokenizer=chat_tokenizer,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(ValueError, match=r"ds:validation row 1, field 'completion'"):
        dm.setup("fit")
    write_jsonl(tmp_path / "ds" / "validation.jsonl", [{"prompt": "Q", "completion": "v"}])
    dm.setup("fit")
    assert list(dm.train_dataset["sample_id"]) == [0, 1, 2, 3] and list(dm.val_dataset["sample_id"]) == [0]
    assert labeled_text(chat_tokenizer, dm.val_dataset[0]) == "v<|im_end|>"


def test_builtin_data_path(chat_tokenizer, tmp_path):
    dm = SFTDataModule(
        train_file="builtin:quickstart/val.jsonl", tokenizer=chat_tokenizer, cache_dir=str(tmp_path / "cache")
    )
    dm.setup("fit")
    assert dm.stats["train"].rejected == 0 and dm.stats["train"].samples == len(dm.train_dataset) > 0


def test_argument_errors():
    with pytest.raises(ValueError, match="not both"):
        SFTDataModule(train_file="a.jsonl", dataset_name="x")
    with pytest.raises(ValueError, match="at most one"):
        SFTDataModule(train_file="a.jsonl", val_file="b.jsonl", val_fraction=0.1)
    with pytest.raises(ValueError, match="no training data"):
        SFTDataModule().setup("fit")


def test_tokenizer_none_needs_a_model(write_jsonl, tmp_path):
    dm = SFTDataModule(train_file=str(write_jsonl(tmp_path / "t.jsonl", numbered_rows(2))))
    with pytest.raises(ValueError, match="not attached to a trainer.*pass tokenizer="):
        dm.setup("fit")


class TinyLM(L.LightningModule):
    """Embedding + linear head; exposes `.tokenizer` like the library's methods do."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self._tokenizer = tokenizer
        self.embed = torch.nn.Embedding(len(tokenizer), 8)
        self.head = torch.nn.Linear(8, len(tokenizer))
        self.sample_ids: list[int] = []

    @property
    def tokenizer(self):
        return self._tokenizer

    def _loss(self, batch) -> torch.Tensor:
        logits = self.head(self.embed(batch["input_ids"]))  # [B, T, V]
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )

    def training_step(self, batch, batch_idx):
        self.sample_ids += batch["sample_id"].tolist()
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_uses_the_models_tokenizer_and_sets_its_template(
    make_sft_datamodule, tokenizer_without_template, tmp_path
):
    model = TinyLM(tokenizer_without_template)
    dm = make_sft_datamodule(numbered_rows(8), None, setup=False, val_fraction=0.25, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.tokenizer is model.tokenizer and model.tokenizer.chat_template == CHATML_TEMPLATE
    assert sorted(model.sample_ids) == sorted(dm.train_dataset["sample_id"]) and len(model.sample_ids) == 6
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_mixed_types_through_load_dataset_give_the_row_error(write_jsonl, chat_tokenizer, tmp_path):
    write_jsonl(
        tmp_path / "ds" / "train.jsonl",
        [{"prompt": "Q", "completion": "a"}, {"prompt": "Q", "completion": 5}],
    )
    dm = SFTDataModule(
        dataset_name=str(tmp_path / "ds"), tokenizer=chat_tokenizer, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ValueError, match=r"ds:train row 1, field 'completion': expected a string, got int"):
        dm.setup("fit")


def test_a_trailing_user_turn_is_reported_once_with_the_count(make_sft_datamodule, chat_tokenizer):
    from lit_tokensel.data.pipeline import trailing_turns

    answered = {
        "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    }
    unanswered = {"messages": [*answered["messages"], {"role": "user", "content": "And 3+3?"}]}
    assert [trailing_turns(answered["messages"]), trailing_turns(unanswered["messages"])] == [0, 1]
    with pytest.warns(UserWarning) as caught:
        dm = make_sft_datamodule([answered, unanswered, unanswered, answered], chat_tokenizer)
    messages = [str(w.message) for w in caught if "after their last assistant turn" in str(w.message)]
    assert messages == [
        "rows ending in turns after their last assistant turn (unanswered, not trained on): {'train': 2}"
    ]
    assert dm.stats["train"].trailing_turn == 2 and dm.stats["train"].samples == 4
