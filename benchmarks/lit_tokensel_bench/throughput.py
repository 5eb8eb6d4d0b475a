"""Response tokens per second and padding fraction, packed vs padded batches, side by side in one run.

    python -m lit_tokensel_bench.throughput                  # CPU, both datasets, four methods (~10 min on 2 cores)
    python -m lit_tokensel_bench.throughput --quick          # fewer steps
    python -m lit_tokensel_bench.throughput --device cuda    # bf16-mixed, SDPA (add --attn flash_attention_2 if installed)

Two datasets, the same samples in the same batches for both layouts (the packed collator packs each
padded batch's samples into rows as wide as the batch's longest sample, or `--row-tokens`, so batch
composition is equal):

- `quickstart`: the shipped quickstart rows, tokenized with the builtin tiny-llama tokenizer and chat template.
- `chat`: random token ids with the prompt and response lengths of real instruction data, drawn
  (seeded) from `benchmarks/lit_tokensel_bench/data/alpaca_en_demo_lengths.json`: the 999 rows of LLaMA-Factory's
  `data/alpaca_en_demo.json` (llamafactory==0.9.5 sdist) tokenized with SmolLM2-135M-Instruct's
  tokenizer and chat template: prompts 34-199 tokens (median 45), responses 3-596 (median 108), whole
  samples median 162, max 750 tokens.

Methods: FullSFT, Rho-1 with cached reference losses, ssToken with an EMA history (attention score on),
Q-Tuning (r_sample 0.25). Each (dataset, method) runs in its own child process with two copies of the
same freshly built Llama (random weights), one fed padded and one packed batches, stepping in
alternation so that machine noise hits both alike. A step is the method's `training_step` (forward,
selection, loss), backward, AdamW step and EMA update, without Lightning's loop (the same for both).
Response tokens/s counts the batch's response tokens (before Q-Tuning drops samples) over the summed
wall time of the timed steps; collation happens outside the step (in DataLoader workers in training)
and its cost per batch is reported separately. Padding fraction is the share of `[rows, T]` positions
that are padding.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lit_tokensel_bench.step_time import build_model

LENGTHS_FILE = Path(__file__).parent / "data" / "alpaca_en_demo_lengths.json"
METHODS = ("FullSFT", "Rho1SFT (cached)", "SsTokenSFT (EMA)", "QTuningSFT (r_sample 0.25)")
LAYOUTS = ("padded", "packed")


def chat_features(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    """`n` samples with (prompt, response) lengths drawn from the alpaca demo table; random token ids."""
    table = json.loads(LENGTHS_FILE.read_text())["rows"]
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    features = []
    for i in range(n):
        prompt, response = rng.choice(table)
        prompt = min(prompt, max_length - 1)
        response = min(response, max_length - prompt)
        ids = torch.randint(3, vocab, (prompt + response,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "sample_id": i})
    return features


def quickstart_features(n: int, max_length: int) -> tuple[list[dict], int]:
    """The first `n` quickstart samples (tokenized by the DataModule) and the tokenizer's vocabulary size."""
    from lit_tokensel.data import SFTDataModule
    from lit_tokensel.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-llama")
    dm = SFTDataModule(
        train_file="builtin:quickstart/train.jsonl", tokenizer=tokenizer, max_length=max_length
    )
    dm.setup_data()
    rows = dm.train_dataset.select(range(min(n, len(dm.train_dataset))))
    features = [
        {"input_ids": r["input_ids"], "labels": r["labels"], "sample_id": r["sample_id"]} for r in rows
    ]
    return features, len(tokenizer)


def make_batches(features: list[dict], layout: str, batch_size: int, row_tokens: int, seed: int = 0):
    """Seeded shuffle into batches of `batch_size` samples, collated padded or packed; cached losses joined."""
    from lit_tokensel.data.collate import DataCollatorForSFT
    from lit_tokensel.data.packing import PackedCollatorForSFT

    rng = np.random.default_rng(seed)
    cached = {
        "reference": {
            f["sample_id"]: rng.uniform(0, 8, len(f["input_ids"]) - 1).astype(np.float32) for f in features
        }
    }
    collate = (
        PackedCollatorForSFT(0, cached=cached, max_tokens_per_row=row_tokens)
        if layout == "packed"
        else DataCollatorForSFT(0, cached=cached)
    )
    order = random.Random(seed).sample(range(len(features)), len(features))
    groups = [[features[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    groups = [g for g in groups if len(g) == batch_size]
    start = time.perf_counter()
    batches = [collate(g) for g in groups]
    return batches, (time.perf_counter() - start) / max(len(batches), 1)


def make_module(method: str, model_dir: str, attn: str):
    from lit_tokensel import FullSFT, Rho1SFT
    from lit_tokensel.methods.qtuning import QTuningSFT
    from lit_tokensel.methods.sstoken import SsTokenSFT
    from lit_tokensel.reference import CachedReference, HistoryReference

    common = {
        "model": model_dir,
        "learning_rate": 1e-4,
        "lr_schedule": "constant",
        "warmup_ratio": 0.0,
        "attn_implementation": attn,
    }
    if method == "FullSFT":
        return FullSFT(**common)
    if method == "Rho1SFT (cached)":
        return Rho1SFT(reference=CachedReference(name="reference"), **common)
    if method == "SsTokenSFT (EMA)":
        return SsTokenSFT(history=HistoryReference("ema", 0.99), warmup=0.0, **common)
    if method.startswith("QTuningSFT"):
        return QTuningSFT(sample_ratio=0.25, **common)
    raise ValueError(method)


def run_pair(job: tuple, args: argparse.Namespace, queue: mp.Queue) -> None:
    """One (dataset, method) in a child process: a padded and a packed copy of the same module train on the
    same batches, step by step in alternation (ABBA...), so machine noise hits both layouts alike.

    A step is the method's `training_step` (forward, selection, loss), backward, AdamW step, and the
    EMA history's update; Lightning's loop around it is the same for both layouts and left out.
    """
    from lit_tokensel.reference import HistoryReference

    dataset, method, model_dir = job
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    features, _ = load_features(dataset, args)
    runs = {}
    for layout in LAYOUTS:
        batches, collate_s = make_batches(features, layout, args.batch_size, args.row_tokens)
        module = make_module(method, model_dir, args.attn)
        module.configure_model()
        module.to(device)
        for reference in module.reference_models():
            reference.setup(module)  # follow the module to the device
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        runs[layout] = {
            "module": module,
            "optimizer": optimizer,
            "batches": batches[: args.warmup + args.steps],
            "collate_s": collate_s,
            "seconds": 0.0,
            "response": 0,
        }
    for step in range(args.warmup + args.steps):
        order = LAYOUTS if step % 2 == 0 else LAYOUTS[::-1]
        for layout in order:
            run = runs[layout]
            batch = {k: v.to(device) for k, v in run["batches"][step].items()}
            seconds = train_step(run["module"], run["optimizer"], batch, device, HistoryReference)
            if step >= args.warmup:
                run["seconds"] += seconds
                run["response"] += int((batch["labels"][:, 1:] != -100).sum())
    result = {}
    for layout, run in runs.items():
        timed = run["batches"][args.warmup :]
        real = sum(int(b["attention_mask"].sum()) for b in timed)
        positions = sum(b["attention_mask"].numel() for b in timed)
        result[layout] = (run["response"], run["seconds"], 1 - real / positions, run["collate_s"])
    queue.put(((dataset, method), result))


def train_step(module, optimizer, batch: dict, device: torch.device, history_cls: type) -> float:
    """Wall time of one training step (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with (
        warnings.catch_warnings(),
        torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"),
    ):
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for reference in module.reference_models():
        if isinstance(reference, history_cls):
            reference.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load_features(dataset: str, args: argparse.Namespace) -> tuple[list[dict], int]:
    n = args.batch_size * (args.warmup + args.steps)
    if dataset == "quickstart":
        return quickstart_features(n, args.max_length)
    return chat_features(n, args.vocab, args.max_length), args.vocab


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--attn", default="sdpa", help="sdpa (default), eager, flash_attention_2 (CUDA)")
    parser.add_argument(
        "--datasets", nargs="+", default=["quickstart", "chat"], choices=("quickstart", "chat")
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only the methods containing NAME")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (both layouts)")
    parser.add_argument("--max-length", type=int, default=1024, help="token cap per sample")
    parser.add_argument(
        "--row-tokens",
        type=int,
        default=None,
        help="tokens per packed row (default: each batch's longest sample, as data.packing_row_tokens)",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary of the chat dataset's model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 3
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    methods = [m for m in METHODS if not args.only or any(n in m for n in args.only)]
    totals: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dirs = {}
        for dataset in args.datasets:
            vocab = load_features(dataset, argparse.Namespace(**{**vars(args), "steps": 0, "warmup": 1}))[1]
            model_dirs[dataset] = Path(tmp) / dataset
            build_model(model_dirs[dataset], args.hidden, args.layers, vocab)
        ctx = mp.get_context("spawn")
        for round_index in range(args.rounds):
            for dataset in args.datasets:
                for method in methods:
                    queue = ctx.Queue()
                    child = ctx.Process(
                        target=run_pair, args=((dataset, method, str(model_dirs[dataset])), args, queue)
                    )
                    child.start()
                    key, result = queue.get()
                    child.join()
                    for layout, (response, seconds, padding, collate_s) in result.items():
                        entry = totals.setdefault((*key, layout), [0, 0.0, padding, collate_s])
                        entry[0] += response
                        entry[1] += seconds
                        print(
                            f"round {round_index + 1}/{args.rounds} {dataset:<10} {method:<27} {layout:<6} "
                            f"{response / seconds:9.0f} response tok/s, padding {padding:.0%}",
                            flush=True,
                        )
    device = (
        torch.cuda.get_device_name() + ", bf16-mixed"
        if args.device == "cuda"
        else f"CPU, {args.threads} threads, fp32"
    )
    print(
        f"\n{device}, attn {args.attn}; Llama hidden={args.hidden} layers={args.layers}; batches of "
        f"{args.batch_size} samples, packed rows of {args.row_tokens or 'the longest sample'} tokens; "
        f"{args.rounds} rounds x {args.steps} "
        f"timed steps\n"
    )
    print(
        "| dataset | method | padding (padded) | padding (packed) | padded tok/s | packed tok/s | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for dataset in args.datasets:
        for method in methods:
            pad, pack = totals[(dataset, method, "padded")], totals[(dataset, method, "packed")]
            a, b = pad[0] / pad[1], pack[0] / pack[1]
            print(
                f"| {dataset} | {method} | {pad[2]:.0%} | {pack[2]:.0%} | {a:.0f} | {b:.0f} | {b / a:.2f}x |"
            )
    collate = {(d, lay): totals[(d, methods[0], lay)][3] * 1e3 for d in args.datasets for lay in LAYOUTS}
    print(
        "\ncollation per batch (ms, outside the step): "
        + ", ".join(f"{d} {lay} {ms:.1f}" for (d, lay), ms in collate.items())
    )


if __name__ == "__main__":
    main()
