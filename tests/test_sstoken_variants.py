"""The search variants of ssToken (docs/beyond-sstoken.md) against independent computations on a fixed batch:
relative and inverted REL, rank combination, protected end-of-turn tokens, the middle layer without the sink."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_tokensel import SsTokenSFT
from lit_tokensel.builtin.models import build_model_dir
from lit_tokensel.reference import FrozenModelReference
from lit_tokensel.selection.scorers import rank_per_sequence, retrospective_excess, sstoken_scores
from lit_tokensel.selection.selectors import turn_ends
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import QUICKSTART_TRAIN, TINY_SPEC, save_perturbed_copy
from tests.test_sstoken import _batch, history_dir, workdir  # noqa: F401  (module fixtures)


@pytest.fixture(scope="module")
def deep_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A 4-layer twin of the tiny model (its middle layer, 2, is not its last) and a perturbed history copy."""
    root = tmp_path_factory.mktemp("deep")
    spec = {**TINY_SPEC, "model": {**TINY_SPEC["model"], "num_hidden_layers": 4}}
    build_model_dir(spec, QUICKSTART_TRAIN, root / "model")
    return str(root / "model"), save_perturbed_copy(str(root / "model"), root / "history", seed=3)


def test_rel_forms_against_hand_values():
    history = torch.tensor([[4.0, 2.0, 1.0]])
    live = torch.tensor([[1.0, 1.0, 2.0]])
    assert retrospective_excess(history, live, "difference").tolist() == [[3.0, 1.0, -1.0]]
    assert retrospective_excess(history, live, "relative").tolist() == [[0.75, 0.5, -1.0]]
    assert retrospective_excess(history, live, "inverted").tolist() == [[-3.0, -1.0, 1.0]]
    with pytest.raises(ValueError, match="rel_form"):
        retrospective_excess(history, live, "ratio")  # type: ignore[arg-type]


def test_rank_per_sequence_scales_ranks_and_breaks_ties_by_position():
    scores = torch.tensor([[3.0, 1.0, 2.0, 7.0], [5.0, 5.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, False], [False, True, False, False]])
    assert rank_per_sequence(scores, valid).tolist() == [
        [1.0, 0.0, 0.5, 0.0],  # 3 > 2 > 1; the padded 7 is ignored
        [0.5, 1.0, 0.0, 0.0],  # tie 5 = 5: the later one ranks higher; 0 lowest
        [0.0, 1.0, 0.0, 0.0],  # one response token: 1
    ]


def test_turn_ends_are_the_last_token_of_each_response_span():
    valid = torch.tensor(
        [
            [False, True, True, False, False, True, True, True, False],
            [True, False, True, False, False, False, False, False, True],
        ]
    )
    assert turn_ends(valid).nonzero().tolist() == [[0, 2], [0, 7], [1, 0], [1, 2], [1, 8]]


def _eager_attention(model_dir: str, batch: dict, layer: int, exclude_sink: bool) -> torch.Tensor:
    """One layer's eager attention mass on the prompt (optionally without the first token), `[B, T-1]`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True
        ).attentions[layer]  # [B, H, T, T]
    labels, mask = batch["labels"], batch["attention_mask"]
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1)
    for b in range(labels.shape[0]):
        first = int(mask[b].nonzero()[0])
        for j in range(labels.shape[1] - 1):
            query = j + 1
            if labels[b, query] == -100:
                continue
            prompt = [
                k
                for k in range(query)
                if labels[b, k] == -100 and mask[b, k] == 1 and not (exclude_sink and k == first)
            ]
            out[b, j] = probs[b, :, query, prompt].sum(-1).mean()
    return out


def _losses(model_dir: str, batch: dict) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_token_cross_entropy(logits, batch["labels"])[0]  # [B, T-1]


def _rank01(values: list[float]) -> list[float]:
    """Ranks scaled to [0, 1], ties by position (earlier lower): the plain-Python twin of rank_per_sequence."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = rank / max(len(values) - 1, 1) if len(values) > 1 else 1.0
    return ranks


VARIANTS = {
    "V1 relative": dict(rel_form="relative"),
    "V2 inverted": dict(rel_form="inverted"),
    "V3 end of turn": dict(keep_end_of_turn=True),
    "V4 rank": dict(combine="rank"),
    "V5 middle, no sink": dict(attention_layer="middle", exclude_sink=True),
    "V6 relative + end of turn": dict(rel_form="relative", keep_end_of_turn=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_mask_equals_an_independent_computation(
    name,
    tiny_model_dir,
    history_dir,  # noqa: F811 (the fixture imported from test_sstoken)
    workdir,  # noqa: F811
    deep_model_dirs,
):
    settings = VARIANTS[name]
    if settings.get("attention_layer") == "middle":
        tiny_model_dir, history_dir = deep_model_dirs  # noqa: F811  (2 layers: the middle one is the last)
    batch = _batch(tiny_model_dir, workdir)
    ratio, gamma = 0.6, 0.5
    module = SsTokenSFT(
        history=FrozenModelReference(model=history_dir),
        model=tiny_model_dir,
        ratio=ratio,
        gamma=gamma,
        **settings,
    )
    module.configure_model()
    module.eval()
    with torch.no_grad():
        keep = module.select_batch(batch).selection.keep

    history, live = _losses(history_dir, batch), _losses(tiny_model_dir, batch)  # [B, T-1]
    n_layers = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.num_hidden_layers
    layer = n_layers // 2 if settings.get("attention_layer") == "middle" else -1
    assert module.attention.layer == (2 if settings.get("attention_layer") == "middle" else -1)
    attention = _eager_attention(tiny_model_dir, batch, layer, settings.get("exclude_sink", False))
    valid = batch["labels"][:, 1:] != -100
    form = settings.get("rel_form", "difference")
    for b in range(valid.shape[0]):
        positions = valid[b].nonzero().flatten().tolist()
        ends = (
            {t for t in positions if t + 1 >= valid.shape[1] or not valid[b, t + 1]}
            if settings.get("keep_end_of_turn")
            else set()
        )
        ranked = [t for t in positions if t not in ends]
        gaps = []
        for t in ranked:
            h, x = float(history[b, t]), float(live[b, t])
            gaps.append({"difference": h - x, "relative": (h - x) / max(h, 1e-6), "inverted": x - h}[form])
        attn = [float(attention[b, t]) for t in ranked]
        if settings.get("combine") == "rank":
            combined = [gamma * r + (1 - gamma) * a for r, a in zip(_rank01(gaps), _rank01(attn))]
        else:
            lo, hi = min(gaps), max(gaps)
            combined = [gamma * (g - lo) / (hi - lo + 1e-8) + (1 - gamma) * a for g, a in zip(gaps, attn)]
        k = math.ceil(round(ratio * len(ranked), 9))
        order = sorted(range(len(ranked)), key=lambda i: (-combined[i], i))
        expected = {ranked[i] for i in order[:k]} | ends
        assert keep[b].nonzero().flatten().tolist() == sorted(expected), f"{name}: sample {b}"
    if settings.get("keep_end_of_turn"):
        assert ends and keep[turn_ends(valid)].all()


def test_rank_combination_is_not_squeezed_by_one_outlier():
    """M5 of the plan: min-max lets one extreme REL push the rest of its sequence to ~0; ranks do not."""
    rel = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    attention = torch.tensor([[0.0, 0.9, 0.5, 0.1]])
    valid = torch.ones_like(rel, dtype=torch.bool)
    minmax = sstoken_scores(rel, attention, valid, 0.5)
    ranked = sstoken_scores(rel, attention, valid, 0.5, combine="rank")
    assert minmax[0, 1:].argmax() == 0  # token 1: attention alone decides among the non-outliers
    assert ranked[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5])  # each signal counts by rank
