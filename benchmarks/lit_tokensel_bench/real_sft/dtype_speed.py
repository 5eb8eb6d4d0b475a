r"""Does this CPU run the study's model faster in bf16 or in fp32? A forward at the study's shape, both ways.

    python -m lit_tokensel_bench.real_sft.dtype_speed                  # 8 x 192 tokens, 3 timed forwards each
    python -m lit_tokensel_bench.real_sft.dtype_speed --rows 8 --tokens 512 --repeats 2

The CPU budget trains in bf16-mixed and scores in bf16 because the machine it was planned on has AMX-BF16
(a forward 3.4x faster than fp32 there). A CPU without AMX or AVX512-BF16 emulates bf16 matrix products
and can be many times slower in bf16 than in fp32: run this first. It loads `StudySettings.model`, times
`--repeats` no-grad forwards of random token ids per dtype after one untimed warm-up, side by side in one
process, and prints the CPU's bf16 flags, the seconds per forward and the bf16/fp32 ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_tokensel_bench.real_sft.plan import CPU

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction-set flags /proc/cpuinfo lists (empty: bf16 is emulated)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in BF16_FLAGS if flag in flags]


def seconds_per_forward(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int) -> float:
    """Mean wall seconds of a no-grad forward over `repeats`, after one untimed warm-up."""
    with torch.no_grad():
        model(input_ids=input_ids)
        started = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=input_ids)
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> int:
    from lit_tokensel.modeling.loading import load_causal_lm

    parser = argparse.ArgumentParser(
        prog="python -m lit_tokensel_bench.real_sft.dtype_speed", description=__doc__
    )
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=CPU.max_length)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=CPU.threads)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_causal_lm(CPU.model).eval()
    input_ids = torch.randint(
        0, model.config.vocab_size, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0)
    )  # [B, T]
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        seconds[dtype] = seconds_per_forward(model.to(dtype), input_ids, args.repeats)
        print(
            f"{str(dtype).removeprefix('torch.')}: {seconds[dtype]:.2f} s per forward of {args.rows} x {args.tokens}"
        )
    flags = cpu_bf16_flags()
    print(f"CPU bf16 flags: {', '.join(flags) or 'none (bf16 is emulated)'}; {args.threads} threads")
    print(f"bf16 / fp32 time: {seconds[torch.bfloat16] / seconds[torch.float32]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
