"""What the real-data study runs: its settings (CPU and GPU budgets), the methods and the job order.

Every method trains SmolLM2-135M-Instruct with the LoRA preset for the same number of optimizer steps on
the same rows (a mix of Alpaca-demo and a NaturalInstructions sample), at the method's shipped defaults
(`configs/methods/*.yaml`, nothing overridden but what a run needs: the reference model, the caches, the
seed). The reference-based methods (Rho-1, TokenCleaning, Forgetting) use a TokenCleaning-style warm-up
reference: the base model fine-tuned on a held-out slice of the same data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lit_tokensel_bench.noisy_sft.plan import BASE_HISTORY, MethodRow, search_rows

METHODS: tuple[MethodRow, ...] = (
    MethodRow("full", "Full SFT", "full", "full_sft", kind="baseline"),
    MethodRow(
        "random", "Random (0.6)", "random", "random", 0.6, ("--model.init_args.selection_seed", "{seed}")
    ),
    MethodRow(
        "rho1",
        "Rho-1 (0.6)",
        "rho1",
        "rho1",
        0.6,
        ("--model.init_args.reference.init_args.model", "{reference}"),
    ),
    MethodRow("tokencleaning", "TokenCleaning fixed (0.6)", "tokencleaning", "token_cleaning", 0.6),
    MethodRow(
        "sstoken-base",
        "ssToken base history (0.6)",
        "sstoken-base",
        "sstoken",
        0.6,
        ("--model.init_args.history", BASE_HISTORY),
    ),
    MethodRow("forgetting", "Forgetting (ρ 0.7, λ 0.25)", "forgetting", "forgetting", 0.7),
    MethodRow("sstoken", "ssToken EMA (0.6)", "sstoken", "sstoken", 0.6),
    MethodRow("qtuning", "Q-Tuning (25% samples, 50% tokens)", "qtuning", "qtuning", 0.5),
    MethodRow("profit", "ProFit (τ=0.1)", "profit", "profit"),
    MethodRow("dft", "DFT", "dft", "dft"),
    MethodRow("eaft", "EAFT (k=20, α=1)", "eaft", "eaft"),
    MethodRow("asft", "ASFT (α=0.1)", "asft", "asft"),
)
"""Every method at its shipped config's defaults; the first six get the extra seeds."""

MULTI_SEED = ("full", "random", "rho1", "tokencleaning", "sstoken-base", "forgetting")
"""Methods run with every seed (the issue asks for at least 3 for these; ssToken with base history, the
released code's setting, stands for ssToken); the others run seed 0 only."""

TASKS = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "boolq",
    "piqa",
    "winogrande",
    "truthfulqa_mc2",
    "mmlu",
    "gsm8k_cot",
)
"""The offline suite (`lit_tokensel_eval/suites/offline.yaml`), in the order its tasks are evaluated."""


CPU_LIMITS: dict[str, int] = {
    "arc_easy": 40,
    "arc_challenge": 40,
    "winogrande": 40,
    "hellaswag": 200,
    "piqa": 200,
    "boolq": 200,
    "truthfulqa_mc2": 40,
    "mmlu": 1,
    "gsm8k_cot": 10,
}
"""Documents per task in the CPU budget (lm-eval's first N; MMLU: per subject, 57 subjects). Every suite task
is scored, each at the count its cost allows. Measured on the base model, 2 threads, the machine otherwise
idle (`python -m lit_tokensel_bench.real_sft.task_costs`, 12-03), seconds per document: Winogrande 0.07,
PIQA 0.09, ARC-E 0.11, ARC-C 0.14, BoolQ 0.18, HellaSwag 0.21, MMLU 5-shot 0.61 (batch 8), TruthfulQA-299 mc2
0.85 (a dozen long options), GSM8K-cot 2.7 (8-shot prompt, up to 256 generated tokens): about 3.5 min of
scoring per run beside 2.4 min of training. The first CPU pass scored ARC-E, ARC-C and Winogrande only (from
per-document costs measured on a loaded machine, 5-10x these); a workdir's task list may
grow (`run.check_workdir`), and runs scored on fewer tasks are then run again."""


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides the numbers; stored in the workdir so a resumed run cannot mix settings."""

    seeds: tuple[int, ...] = (0, 1, 2)
    alpaca_rows: int = 999
    """Alpaca-demo rows in the pool (all of them)."""
    ni_rows: int = 3000
    """NaturalInstructions v1 rows in the pool (a task-balanced sample, `builtin:natural_instructions-n<N>-seed0`)."""
    train_rows: int = 256
    reference_rows: int = 128
    """Held-out rows of the same pool that train the warm-up reference."""
    max_length: int = 192
    min_answer_tokens: int = 16
    """A row is kept when its prompt leaves this many of `max_length` tokens to the answer."""
    batch_size: int = 8
    epochs: int = 1
    learning_rate: float = 1e-3
    data_seed: int = 0
    model: str = "builtin:smollm2-135m-instruct"
    limits: dict[str, int] = field(default_factory=lambda: dict(CPU_LIMITS))
    """Documents per task (lm-eval's first N; MMLU: per subject, 57 subjects); a task not listed is not run."""
    proxy_rows: int = 100
    proxy_max_tokens: int = 64
    proxy_seed: int = 0
    eval_batch_size: int = 32
    device: str = "cpu"
    threads: int = 2
    precision: str = "bf16-mixed"
    """Training precision. bf16 autocast with fp32 master weights: the CPU the study was planned on has
    AMX-BF16, and a LoRA step of SmolLM2 at 8 x 192 tokens measured 1.6x faster than fp32 there. Without
    AMX/AVX512-BF16 bf16 is emulated and slower (`dtype_speed`); `--fp32` then sets both dtypes to fp32."""
    eval_dtype: str = "bfloat16"
    """The merged model is scored in this dtype (a forward at 8 x 192 tokens with AMX: 3.4 s in bf16, 11.6 s in
    fp32; on an AVX2-only AMD EPYC: 26.1 s in bf16, 17.2 s in fp32)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def steps(self) -> int:
        return self.epochs * -(-self.train_rows // self.batch_size)


CPU = StudySettings()
GPU = StudySettings(
    ni_rows=8000,
    train_rows=4800,
    reference_rows=1000,
    max_length=512,
    min_answer_tokens=64,
    batch_size=16,
    epochs=2,
    learning_rate=2e-4,
    limits={t: 1000 for t in TASKS if t != "mmlu"} | {"mmlu": 100, "gsm8k_cot": 500},
    proxy_rows=805,
    proxy_max_tokens=512,
    eval_batch_size=64,
    device="cuda",
    seeds=(0, 1, 2),
)
"""The larger budget for one CUDA device (`--gpu`): more rows, longer rows, every task on up to 1,000 documents.
At 512 tokens about 7 in 10 NaturalInstructions prompts leave 64 tokens to the answer: 8,000 sampled rows give a
pool of 6,712 for the 5,800 needed (5,000 gave 4,556, and the data step refused to start)."""


CPU_2K = StudySettings(ni_rows=12000, train_rows=2048, reference_rows=256)
"""The CPU budget at the issue's scale of training data (`--cpu-2k`): 2,048 training rows (256 optimizer steps,
8x the CPU budget's) from a pool grown to 12,000 NaturalInstructions rows (at 192 tokens about one in eight
fits), every other setting the CPU budget's. About 20 min of training a run on 2 cores, so it is run for the
head-to-head rows only (`--only full rho1 --seeds 0`), in its own workdir; the reference trains as many steps
as the methods, on 256 held-out rows (8 epochs, near the GPU budget's 9.6)."""


QUICK = StudySettings(
    seeds=(0,),
    ni_rows=300,
    train_rows=32,
    reference_rows=16,
    limits={"arc_easy": 4, "boolq": 2, "truthfulqa_mc2": 2},
    proxy_rows=8,
    proxy_max_tokens=32,
)
"""A smoke run (`--quick`): 4 steps per method, a few documents; checks the pipeline end to end, not the methods."""


SEARCH_METHODS: tuple[MethodRow, ...] = tuple(
    MethodRow(row.family, row.name, row.family, row.config, row.ratio, row.overrides, row.score)
    for row in search_rows()
)
"""The six pre-registered ssToken variants of the search beyond ssToken (`--search`, docs/beyond-sstoken.md):
the noisy-SFT benchmark's rows (`noisy_sft.plan.search_rows`, the same arguments), keyed without the ratio
like this study's rows (`v1-relative`, ...). V3's base history is the base model's cached losses, as for
`sstoken-base`. Each runs every seed."""

SEARCH_BASELINES = ("full", "sstoken", "sstoken-base", "rho1")
"""The study's rows the variants are compared with (their finished runs are reused, not run again)."""


def method_seeds(settings: StudySettings, key: str) -> tuple[int, ...]:
    multi = key in MULTI_SEED or any(row.key == key for row in SEARCH_METHODS)
    return settings.seeds if multi else settings.seeds[:1]


def job_order(settings: StudySettings) -> list[tuple[MethodRow, int]]:
    """(method, seed) in run order: seed 0 of every method first, then each further seed of the multi-seed
    methods, so that a run stopped early still has every method once."""
    order = []
    for seed in settings.seeds:
        order += [(row, seed) for row in METHODS if seed in method_seeds(settings, row.key)]
    return order


def search_job_order(settings: StudySettings) -> list[tuple[MethodRow, int]]:
    """The search's variants x seeds, seed 0 of every variant first; they run after `job_order`'s jobs."""
    return [(row, seed) for seed in settings.seeds for row in SEARCH_METHODS]
