"""ssToken's prompt attention score against an independent eager reference (`output_attentions=True`)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lit_tokensel.modeling.attention_score import PromptAttentionScore, prompt_key_mask

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.2,  # peaked attention, so a wrong mask or RoPE shows well above 1e-5
}
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # layer 0 full, layer 1 (= -1) with a sliding window shorter than the sequences
    "qwen2-window": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 5},
    ),
    "mistral-window": (MistralConfig, MistralForCausalLM, {"sliding_window": 6}),
}
ATOL = 1e-5

# Samples as explicit turns: ("p", n) prompt tokens (system/user), ("r", n) response tokens.
RAGGED = [
    [("p", 4), ("r", 3), ("p", 3), ("r", 4)],  # two turns
    [("p", 5), ("r", 6)],
    [("p", 3), ("r", 2)],
    [("p", 2), ("r", 2), ("p", 2), ("r", 2), ("p", 1), ("r", 3)],  # three turns
]
EQUAL = [  # same length: no padding at all
    [("p", 4), ("r", 3), ("p", 2), ("r", 5)],
    [("p", 6), ("r", 8)],
]
BATCHES = {"right": (RAGGED, "right"), "left": (RAGGED, "left"), "unpadded": (EQUAL, "right")}

Spans = list[list[tuple[str, int, int]]]


def make_models(arch: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same seeded weights with SDPA (model under test) and eager attention (the reference)."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    sdpa = model_cls(config_cls(**TINY, **extra, attn_implementation="sdpa")).eval()
    eager = model_cls(config_cls(**TINY, **extra, attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def make_batch(samples: list[list[tuple[str, int]]], side: str, seed: int = 0) -> tuple[dict, Spans]:
    """A padded batch plus each sample's turn spans `(kind, start, end)` in batch positions."""
    g = torch.Generator().manual_seed(seed)
    width = max(sum(n for _, n in s) for s in samples)
    batch = {
        "input_ids": torch.zeros(len(samples), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(samples), width, dtype=torch.long),
        "labels": torch.full((len(samples), width), -100),
        "sample_id": torch.arange(len(samples)),
    }
    spans: Spans = []
    for b, sample in enumerate(samples):
        length = sum(n for _, n in sample)
        pos = width - length if side == "left" else 0
        batch["attention_mask"][b, pos : pos + length] = 1
        spans.append([])
        for kind, n in sample:
            ids = torch.randint(1, TINY["vocab_size"], (n,), generator=g)
            batch["input_ids"][b, pos : pos + n] = ids
            if kind == "r":
                batch["labels"][b, pos : pos + n] = ids
            spans[-1].append((kind, pos, pos + n))
            pos += n
    return batch, spans


def reference_scores(
    eager: torch.nn.Module,
    batch: dict,
    spans: Spans,
    layer: int,
    exclude_sink: bool = False,
    response_keys: bool = False,
) -> torch.Tensor:
    """Eager probabilities of `layer`, summed over the prompt keys from the turn spans, mean over heads.

    The prompt of a response span is every prompt token of the earlier turns and of its own turn;
    `response_keys=True` wrongly adds earlier responses (to show the test can tell them apart).
    """
    with torch.no_grad():
        probs = eager(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True
        ).attentions[layer]  # [B, H, T, T]
    ref = torch.zeros(probs.shape[0], probs.shape[-1] - 1)
    for b, sample in enumerate(spans):
        sink = sample[0][1]
        for kind, start, end in sample:
            if kind != "r":
                continue
            earlier = [(s, e) for kd, s, e in sample if (kd == "p" or response_keys) and e <= start]
            keys = [k for s, e in earlier for k in range(s, e)]
            keys = [k for k in keys if not (exclude_sink and k == sink)]
            for p in range(start, end):
                ref[b, p - 1] = probs[b, :, p, keys].sum(-1).mean()  # entry j <-> row j+1
    return ref


def run_scores(model: torch.nn.Module, batch: dict, decoder_only: bool = False, **kwargs) -> torch.Tensor:
    scorer = PromptAttentionScore(model, **kwargs)
    with scorer.capture(batch):
        net = (
            (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
            if decoder_only
            else model
        )
        net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert scorer.scores is not None
    return scorer.scores


@pytest.mark.parametrize("layer", [0, -1])
@pytest.mark.parametrize("padding", list(BATCHES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_eager_reference(arch: str, padding: str, layer: int) -> None:
    sdpa, eager = make_models(arch)
    batch, spans = make_batch(*BATCHES[padding])
    scores = run_scores(sdpa, batch, layer=layer)
    ref = reference_scores(eager, batch, spans, layer)
    assert scores.shape == (batch["labels"].shape[0], batch["labels"].shape[1] - 1)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref, atol=ATOL, rtol=0)
    response = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    assert (scores[~response] == 0).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    if ARCHS[arch][2].get("sliding_window") is None:
        assert (scores[response] > 0).all()  # every response row sees a prompt


def test_reference_tells_definitions_apart() -> None:
    """The test data is sensitive: counting turn-1 responses as prompt moves turn-2 scores far above 1e-5."""
    _, eager = make_models("llama")
    batch, spans = make_batch(RAGGED, "right")
    right = reference_scores(eager, batch, spans, -1)
    wrong = reference_scores(eager, batch, spans, -1, response_keys=True)
    assert (right - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("padding", list(BATCHES))
def test_exclude_sink(padding: str) -> None:
    sdpa, eager = make_models("llama")
    batch, spans = make_batch(*BATCHES[padding])
    scores = run_scores(sdpa, batch, exclude_sink=True)
    ref = reference_scores(eager, batch, spans, -1, exclude_sink=True)
    torch.testing.assert_close(scores, ref, atol=ATOL, rtol=0)
    with_sink = run_scores(sdpa, batch)
    assert (scores <= with_sink + 1e-7).all() and (scores < with_sink - 1e-4).any()


def test_prompt_key_mask_multi_turn_and_padding() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7, -100], [-100, -100, -100, 3, 4, -100, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 0, 0, 1, 0, 0], [0, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(prompt_key_mask(labels, mask), expected)
    expected[0, 0] = expected[1, 1] = False
    assert torch.equal(prompt_key_mask(labels, mask, exclude_sink=True), expected)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # from peft: deprecated is_gradient_checkpointing
def test_lora_adapter_is_included_and_dropout_does_not_leak() -> None:
    from peft import LoraConfig, get_peft_model

    sdpa, eager = make_models("qwen2")
    batch, spans = make_batch(RAGGED, "left")
    base_ref = reference_scores(eager, batch, spans, -1)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.5,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    model = get_peft_model(sdpa, lora).eval()  # (new LoRA modules start in training mode)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.set_attn_implementation("eager")
    merged.eval()
    ref = reference_scores(merged, batch, spans, -1)
    assert (ref - base_ref).abs().max() > 1e-2  # the adapter changes the attention
    for decoder_only in (False, True):
        torch.testing.assert_close(run_scores(model, batch, decoder_only), ref, atol=ATOL, rtol=0)

    # Training mode: dropout changes the hidden states that reach layer 1, but layer 0 sees the
    # embeddings, so its score must still equal the dropout-free reference.
    model.train()
    torch.testing.assert_close(
        run_scores(model, batch, layer=0), reference_scores(merged, batch, spans, 0), atol=ATOL, rtol=0
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(1)
    plain = model(**inputs).logits
    scorer = PromptAttentionScore(model)
    torch.manual_seed(1)
    with scorer.capture(batch):
        captured = model(**inputs).logits
    assert torch.equal(plain, captured)  # no draws from the RNG, no change to the forward


def test_model_forward_untouched() -> None:
    model, _ = make_models("llama")
    batch, _ = make_batch(RAGGED, "right")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    plain = model(**inputs).logits
    scorer = PromptAttentionScore(model, layer=0)
    with scorer.capture(batch):
        captured = model(**inputs).logits
    assert torch.equal(plain, captured)
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in model.model.layers)
    assert not model.model.layers[0].self_attn._forward_pre_hooks  # removed after the block
    assert scorer.calls == 1


def test_scores_detached_and_loss_backpropagates() -> None:
    model, _ = make_models("llama")
    model.train()
    batch, _ = make_batch(RAGGED, "right")
    scorer = PromptAttentionScore(model)
    with scorer.capture(batch):
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert scorer.scores is not None and not scorer.scores.requires_grad
    loss.backward()
    grad = model.model.layers[-1].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_enable: deprecated in 5.23
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_scores_once(reentrant: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model, eager = make_models("llama")
    batch, spans = make_batch(RAGGED, "left")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    computed = []
    original = PromptAttentionScore._score

    def counting_score(self: PromptAttentionScore, *args: torch.Tensor) -> torch.Tensor:
        computed.append(1)
        return original(self, *args)

    monkeypatch.setattr(PromptAttentionScore, "_score", counting_score)
    scorer = PromptAttentionScore(model)
    with scorer.capture(batch):
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        loss.backward()
    assert scorer.calls == 2  # the hook fired again in the recomputation ...
    assert len(computed) == 1  # ... but scored only once
    torch.testing.assert_close(scorer.scores, reference_scores(eager, batch, spans, -1), atol=ATOL, rtol=0)


def test_row_chunking_and_bf16() -> None:
    model, eager = make_models("mistral-window")
    batch, spans = make_batch(RAGGED, "right")
    ref = reference_scores(eager, batch, spans, -1)
    torch.testing.assert_close(run_scores(model, batch, max_block_elements=1), ref, atol=ATOL, rtol=0)
    scores = run_scores(model.to(torch.bfloat16), batch)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref, atol=3e-2, rtol=0)


def test_unsupported_architecture_and_layer_index() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match=r"Llama/Qwen2/Mistral.*found GPT2"):
        PromptAttentionScore(gpt2)
    model, _ = make_models("llama")
    PromptAttentionScore(model, layer=-2)
    with pytest.raises(ValueError, match="out of range"):
        PromptAttentionScore(model, layer=2)
    with pytest.raises(ValueError, match="out of range"):
        PromptAttentionScore(model, layer=-3)


def test_capture_checks_batch_shape() -> None:
    model, _ = make_models("llama")
    batch, _ = make_batch(RAGGED, "right")
    scorer = PromptAttentionScore(model)
    with pytest.raises(ValueError, match="do not match"), scorer.capture(batch):
        model(input_ids=batch["input_ids"][:, :-1], attention_mask=batch["attention_mask"][:, :-1])


def test_float32_under_autocast() -> None:
    """Mixed precision: layer 0 sees float32 embeddings, so its score must not drop to bf16 matmuls."""
    model, eager = make_models("llama")
    batch, spans = make_batch(RAGGED, "right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = run_scores(model, batch, layer=0)
    torch.testing.assert_close(scores, reference_scores(eager, batch, spans, 0), atol=ATOL, rtol=0)


def test_a_second_forward_inside_one_capture_is_an_error() -> None:
    model, _ = make_models("llama")
    batch, _ = make_batch(RAGGED, "right")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    scorer = PromptAttentionScore(model)
    with scorer.capture(batch):
        model(**inputs)
    first = scorer.scores
    with pytest.raises(RuntimeError, match="second forward through the scored layer"), scorer.capture(batch):
        model(**inputs)
        with torch.no_grad():
            model(**inputs)  # e.g. a reference sharing these weights
    assert scorer.calls == 2 and torch.equal(scorer.scores, first)  # the first forward's scores stand
    with scorer.capture(batch):  # a fresh block starts over
        model(**inputs)
    assert scorer.calls == 1
