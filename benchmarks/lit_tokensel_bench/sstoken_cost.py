"""What ssToken costs over full SFT, and what the naive implementation would cost, in one process.

    python -m lit_tokensel_bench.sstoken_cost                 # 8 and 4 layers, T=512 (~5 minutes on 2 CPU cores)
    python -m lit_tokensel_bench.sstoken_cost --quick         # smaller, for a smoke run

Every variant trains its own copy of the same Llama (built here, random weights) on the same batches,
interleaved over rounds so machine noise hits all alike; step time is the median over all timed steps,
and each ratio is the median over rounds of the ratio of the two variants' medians in that round.
Memory on CPU is measured inside this one process: a step's transient peak comes from the profiler's
allocation events (`profile_memory=True`), and the persistent state (weights, gradients' owners, optimizer
moments, history shadows, a reference model) is counted by unique storage. Peak = persistent + transient.

Variants: FullSFT; SsTokenSFT with an EMA history; with the base as history under LoRA (adapter
disabled; compared with FullSFT under the same LoRA); with cached base losses; with gamma=1 (no attention
score); and a naive ssToken written here as the comparison point: eager attention with
`output_attentions=True` in every layer plus a second full model copy as the EMA history.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from lit_tokensel import FullSFT, SsTokenSFT
from lit_tokensel.methods.base import TokenSelectionModule
from lit_tokensel.modeling.loading import LoraSettings
from lit_tokensel.reference import AdapterDisabledReference, CachedReference, HistoryReference
from lit_tokensel.selection.scorers import sstoken_scores
from lit_tokensel.selection.selectors import top_k_per_sequence
from lit_tokensel.selection.token_loss import masked_sum, per_token_cross_entropy

MiB = 2**20


def build_model(hidden: int, layers: int, vocab: int, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def make_batches(n: int, batch_size: int, length: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Random tokens; prompts of 30-50% of each row (-100), right padding on half the rows, cached base losses."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        input_ids = torch.randint(0, vocab, (batch_size, length), generator=g)
        attention_mask = torch.ones_like(input_ids)
        labels = input_ids.clone()
        for row in range(batch_size):
            prompt = int(length * (0.3 + 0.2 * row / max(batch_size - 1, 1)))
            labels[row, :prompt] = -100
            if row % 2:
                attention_mask[row, -length // 8 :] = 0
                labels[row, -length // 8 :] = -100
        valid = labels[:, 1:] != -100
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": labels,
                "sample_id": torch.arange(batch_size),
                "cached/base": torch.rand(batch_size, length - 1, generator=g) * 8 * valid,
            }
        )
    return batches


class Variant:
    """One method's module, optimizer and step function."""

    def __init__(
        self,
        name: str,
        module: TokenSelectionModule | None,
        model: torch.nn.Module,
        step: Callable[[dict], torch.Tensor],
        extra_state: Callable[[], Iterable[torch.Tensor]],
        on_step_end: Callable[[], None] = lambda: None,
    ) -> None:
        self.name, self.module, self.model, self._step = name, module, model, step
        self.extra_state, self.on_step_end = extra_state, on_step_end
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[list[float]] = []  # per round, per step

    def step(self, batch: dict) -> None:
        loss = self._step(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.on_step_end()

    def persistent_bytes(self) -> int:
        tensors = [p for p in self.model.parameters()]
        tensors += [
            t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        ]
        tensors += list(self.extra_state())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def lit_variant(name: str, module: TokenSelectionModule) -> Variant:
    module.configure_model()
    module.train()
    history = getattr(module, "history", None)

    def extra() -> list[torch.Tensor]:
        if isinstance(history, HistoryReference):
            return list(history.shadow) + [t for snap in history.pending for t in snap]
        return []

    def on_step_end() -> None:
        if isinstance(history, HistoryReference) and module.gamma > 0:
            history.update()  # what the HistoryUpdate callback does after each optimizer step

    return Variant(name, module, module.model, lambda b: module.training_step(b, 0), extra, on_step_end)


def naive_variant(
    hidden: int, layers: int, vocab: int, ratio: float = 0.6, gamma: float = 0.5, decay: float = 0.99
) -> Variant:
    """The released code's shape: eager attention maps of every layer, a full second model as history."""
    model = build_model(hidden, layers, vocab, attn="eager").train()
    history = copy.deepcopy(model).eval()
    for p in history.parameters():
        p.requires_grad_(False)

    def step(batch: dict) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True
        )
        losses, valid = per_token_cross_entropy(out.logits, batch["labels"])  # [B, T-1]
        probs = out.attentions[-1].detach()  # [B, H, T, T]
        prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()  # [B, T]
        attention = (probs * prompt[:, None, None, :]).sum(-1).mean(1)[:, 1:]  # [B, T-1], row j+1 for entry j
        with torch.no_grad():
            his_logits = history(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            his_losses, _ = per_token_cross_entropy(his_logits, batch["labels"])
        rel = his_losses - losses.detach()
        keep = top_k_per_sequence(sstoken_scores(rel, attention * valid, valid, gamma), valid, ratio)
        return masked_sum(losses, keep) / keep.sum().clamp_min(1)

    @torch.no_grad()
    def ema() -> None:
        for h, p in zip(history.parameters(), model.parameters(), strict=True):
            h.lerp_(p, 1 - decay)

    return Variant(
        "naive ssToken (eager, all-layer attentions, model copy)",
        None,
        model,
        step,
        lambda: list(history.parameters()),
        ema,
    )


def transient_peak_bytes(variant: Variant, batch: dict) -> int:
    """Peak of bytes allocated during one step above what was allocated before it.

    Each profiler event carries its own net allocation (`self_cpu_memory_usage`; frees outside any op
    are `[memory]` events); their running sum in start order traces the allocated bytes op by op.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step(batch)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for event in events:
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def run(layers: int, args: argparse.Namespace) -> None:
    hidden, vocab, length = args.hidden, args.vocab, args.length
    batches = make_batches(args.steps, args.batch_size, length, vocab)
    lora = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear")

    def model_dir_free(cls, **kw) -> TokenSelectionModule:
        module = cls(model="unused", **kw)
        module.model = build_model(hidden, layers, vocab)  # configure_model keeps a model that is already set
        if kw.get("lora"):
            from lit_tokensel.modeling.loading import apply_lora

            module.model = apply_lora(module.model, kw["lora"])
        module._tokenizer = object()  # never used: batches are token ids already
        for reference in module.reference_models():
            reference.setup(module)
        return module

    ema = dict(history=HistoryReference("ema", 0.99))
    variants = [
        lit_variant("FullSFT", model_dir_free(FullSFT)),
        lit_variant("SsTokenSFT, EMA history", model_dir_free(SsTokenSFT, **ema)),
        lit_variant(
            "SsTokenSFT, cached base losses", model_dir_free(SsTokenSFT, history=CachedReference("base"))
        ),
        lit_variant(
            "SsTokenSFT, EMA history, gamma=1",
            model_dir_free(SsTokenSFT, gamma=1.0, history=HistoryReference("ema", 0.99)),
        ),
        lit_variant("FullSFT, LoRA", model_dir_free(FullSFT, lora=lora)),
        lit_variant(
            "SsTokenSFT, base history (LoRA, adapter off)",
            model_dir_free(SsTokenSFT, lora=lora, history=AdapterDisabledReference()),
        ),
        naive_variant(hidden, layers, vocab),
    ]
    for v in variants:  # warm-up step (allocator, optimizer state)
        v.step(batches[0])
    for _ in range(args.rounds):
        for v in variants:
            v.times.append([])
            for batch in batches:
                start = time.perf_counter()
                v.step(batch)
                v.times[-1].append(time.perf_counter() - start)
    peaks = {v.name: v.persistent_bytes() + transient_peak_bytes(v, batches[0]) for v in variants}
    medians = {v.name: statistics.median(t for r in v.times for t in r) for v in variants}
    by_name = {v.name: v for v in variants}

    def ratio(name: str, baseline: str) -> float:
        """Median over rounds of the round's median-step ratio: drift between rounds cancels out."""
        a, b = by_name[name].times, by_name[baseline].times
        return statistics.median(
            statistics.median(x) / statistics.median(y) for x, y in zip(a, b, strict=True)
        )

    base = {v.name: ("FullSFT, LoRA" if "LoRA" in v.name else "FullSFT") for v in variants}
    heads = hidden // 32
    weights = sum(p.numel() * p.element_size() for p in variants[0].model.parameters())
    block = args.batch_size * heads * length * length * 4
    print(
        f"\n## {layers} layers, hidden {hidden}, vocab {vocab}, batch {args.batch_size} x {length} tokens "
        f"({args.rounds} rounds x {args.steps} steps)\n"
    )
    print(
        "| variant | median step (ms) | time vs baseline | peak memory (MiB) | extra memory vs baseline (MiB) |"
    )
    print("|---|---|---|---|---|")
    for v in variants:
        b = base[v.name]
        print(
            f"| {v.name} | {medians[v.name] * 1e3:.1f} | {ratio(v.name, b):.3f}x | "
            f"{peaks[v.name] / MiB:.1f} | {(peaks[v.name] - peaks[b]) / MiB:+.1f} |"
        )
    att = ratio("SsTokenSFT, EMA history", "SsTokenSFT, EMA history, gamma=1")
    extra = peaks["SsTokenSFT, EMA history"] - peaks["FullSFT"]
    naive = peaks[variants[-1].name] - peaks["FullSFT"]
    print(
        f"\nattention score over gamma=1: {att:.3f}x; EMA extra memory {extra / MiB:.1f} MiB vs budget "
        f"(trainable weights {weights / MiB:.1f} + one layer's attention block {block / MiB:.1f}) "
        f"= {(weights + block) / MiB:.1f} MiB; naive extra {naive / MiB:.1f} MiB ({naive / max(extra, 1):.1f}x ours)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 layers, T=128, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.length, args.rounds, args.steps, args.hidden, args.vocab = [2], 128, 1, 2, 128, 2048
    torch.manual_seed(0)
    for layers in args.layers:
        run(layers, args)


if __name__ == "__main__":
    main()
