"""What the noisy-SFT benchmark runs: its settings (full and `--quick`) and one spec per method row.

A row is a method at one keep ratio. Every row trains the same model for the same number of optimizer
steps on the same noisy data with the same seeds; only the method config (the shipped
`configs/methods/*.yaml`, so the benchmark runs the defaults users get) and its ratio differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

REGIMES = ("scratch", "pretrained")
"""`scratch`: a random-init model trained on the noisy data. `pretrained`: a base first trained on clean
data over disjoint entities (it knows the format and skills, not the SFT facts), then SFT on the noisy data."""
BASE_HISTORY = '{"class_path": "lit_tokensel.reference.CachedReference", "init_args": {"name": "base"}}'
"""ssToken's history as the base model's cached losses (the released code's setting), for
`--model.init_args.history`."""


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers; stored in the workdir so a resumed run cannot mix settings."""

    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = (0.6, 0.8)
    train_rows: int = 1600
    reference_rows: int = 400
    base_rows: int = 3000
    epochs: int = 3
    base_epochs: int = 3
    batch_size: int = 16
    max_length: int = 96
    learning_rate: dict[str, float] = field(default_factory=lambda: {"scratch": 3e-3, "pretrained": 1e-3})
    inspect_points: int = 3
    inspect_limit: int = 256
    self_evolving_chunks: int = 3
    data_seed: int = 0
    model: ModelShape = field(default_factory=ModelShape)
    pretrained_model: str | None = None
    """A given pretrained base (e.g. `builtin:smollm2-135m-instruct`) instead of the tiny model pretrained here."""
    extra_configs: tuple[str, ...] = ()
    """Configs stacked on every run after the method's (e.g. the LoRA preset), relative to `configs/`."""
    extra_args: tuple[str, ...] = ()
    """LightningCLI arguments added to every run after everything else (they override the configs)."""
    regimes: tuple[str, ...] = REGIMES
    ablations: bool = True
    """ssToken's gamma=0 and gamma=1 rows (at the first ratio)."""
    row_keys: tuple[str, ...] | None = None
    """Only these rows (keys); None: every row."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train_rows // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


FULL = Settings()
QUICK = Settings(
    seeds=(0,),
    ratios=(0.8,),
    train_rows=800,
    reference_rows=240,
    base_rows=1200,
    epochs=2,
    base_epochs=2,
    inspect_points=2,
    inspect_limit=128,
    ablations=False,
    model=ModelShape(hidden_size=64, intermediate_size=192, num_hidden_layers=2),
)

SMOLLM2 = Settings(
    seeds=(0,),
    ratios=(0.6,),
    train_rows=480,
    reference_rows=160,
    batch_size=8,
    epochs=1,
    learning_rate={"pretrained": 1e-3},
    inspect_points=2,
    inspect_limit=64,
    pretrained_model="builtin:smollm2-135m-instruct",
    extra_configs=("presets/smollm2_lora.yaml",),
    extra_args=("--trainer.accumulate_grad_batches", "1"),  # 60 optimizer steps of 8 rows: ~2.6 s each here
    regimes=("pretrained",),
    row_keys=("full", "rho1-0.6", "sstoken-base-0.6", "forgetting-0.6", "dft", "eaft", "asft", "reference"),
)
"""The real-model run: SmolLM2-135M-Instruct with LoRA, the papers' regime, seven methods, one seed (CPU)."""


@dataclass(frozen=True)
class MethodRow:
    """One row of the results table.

    Args:
        key: Directory-safe identifier, e.g. `rho1-0.6`.
        name: Display name.
        family: Method family (groups rows in plots).
        config: Method config under `configs/methods/`, or None for rows that train nothing.
        ratio: Keep ratio, or None for methods without one.
        overrides: Extra LightningCLI arguments (`--model.init_args.x`, `--data.x`); `{base}`/`{reference}`
            are replaced by the regime's model directories, `{seed}` by the run's seed.
        score: `(name, sign)` of the score whose ranking the method keeps (sign +1: high = keep), for the AUC.
        kind: `baseline`, `method`, `oracle` or `reference`.
        regimes: Regimes the row runs in.
    """

    key: str
    name: str
    family: str
    config: str | None
    ratio: float | None = None
    overrides: tuple[str, ...] = ()
    score: tuple[str, int] | None = None
    kind: str = "method"
    regimes: tuple[str, ...] = REGIMES


def _ratio_rows(ratio: float, ablations: bool) -> list[MethodRow]:
    r = f"{ratio:g}"
    ema, base_history = "sstoken", "sstoken-base"
    rows = [
        MethodRow(
            f"random-{r}",
            f"Random ({r})",
            "random",
            "random",
            ratio,
            ("--model.init_args.ratio", r, "--model.init_args.selection_seed", "{seed}"),
            ("random", 1),
        ),
        MethodRow(
            f"rho1-{r}",
            f"Rho-1 ({r})",
            "rho1",
            "rho1",
            ratio,
            ("--model.init_args.ratio", r, "--model.init_args.reference.init_args.model", "{reference}"),
            ("excess_loss", 1),
        ),
        MethodRow(
            f"tokencleaning-{r}",
            f"TokenCleaning fixed ({r})",
            "tokencleaning",
            "token_cleaning",
            ratio,
            ("--model.init_args.ratio", r),
            ("influence", 1),
        ),
        MethodRow(
            f"tokencleaning-se-{r}",
            f"TokenCleaning self-evolving ({r})",
            "tokencleaning-se",
            "token_cleaning_self_evolving",
            ratio,
            ("--model.init_args.ratio", r),
            ("influence", 1),
        ),
        MethodRow(
            f"{ema}-{r}",
            f"ssToken EMA ({r})",
            "sstoken",
            "sstoken",
            ratio,
            ("--model.init_args.ratio", r),
            ("sstoken", 1),
        ),
        MethodRow(
            f"{base_history}-{r}",
            f"ssToken base history ({r})",
            "sstoken-base",
            "sstoken",
            ratio,
            (
                "--model.init_args.ratio",
                r,
                "--model.init_args.history",
                BASE_HISTORY,
            ),
            ("sstoken", 1),
            regimes=("pretrained",),
        ),
        MethodRow(
            f"forgetting-{r}",
            f"Forgetting ({r})",
            "forgetting",
            "forgetting",
            ratio,
            ("--model.init_args.ratio", r),
            ("influence", 1),
        ),
        MethodRow(
            f"qtuning-{r}",
            f"Q-Tuning (r_token {r})",
            "qtuning",
            "qtuning",
            ratio,
            ("--model.init_args.ratio", r),
            ("smoothed_ppl", -1),
        ),
    ]
    if ablations:  # ssToken's two ablations (at the first ratio only, to keep the run within its time budget)
        rows += [
            MethodRow(
                f"sstoken-gamma0-{r}",
                f"ssToken attention only, γ=0 ({r})",
                "sstoken-gamma0",
                "sstoken",
                ratio,
                ("--model.init_args.ratio", r, "--model.init_args.gamma", "0.0"),
                ("attention", 1),
            ),
            MethodRow(
                f"sstoken-gamma1-{r}",
                f"ssToken REL only, γ=1 ({r})",
                "sstoken-gamma1",
                "sstoken",
                ratio,
                ("--model.init_args.ratio", r, "--model.init_args.gamma", "1.0"),
                ("sstoken", 1),
            ),
        ]
    return rows


def method_rows(settings: Settings) -> list[MethodRow]:
    """Every row, in table order: full SFT, the methods at each ratio, ProFit, the token-weighting losses, the
    oracle, the references."""
    rows = [MethodRow("full", "Full SFT", "full", "full_sft", kind="baseline")]
    for index, ratio in enumerate(settings.ratios):
        rows += _ratio_rows(ratio, ablations=settings.ablations and index == 0)
    rows.append(MethodRow("profit", "ProFit (τ=0.1)", "profit", "profit", None, (), ("probability", 1)))
    # The token-weighting losses keep every token; their AUC is that of the weight they give it.
    rows.append(MethodRow("dft", "DFT", "dft", "dft", None, (), ("probability", 1)))
    rows.append(MethodRow("eaft", "EAFT (k=20, α=1)", "eaft", "eaft", None, (), ("topk_entropy", 1)))
    rows.append(MethodRow("asft", "ASFT (α=0.1)", "asft", "asft", None, (), ("probability", 1)))
    rows.append(
        MethodRow(
            "oracle",
            "Oracle (drops exactly the corrupted tokens)",
            "oracle",
            "oracle",
            None,
            (),
            ("clean", 1),
            kind="oracle",
        )
    )
    rows.append(
        MethodRow("reference", "Reference model alone (clean data only)", "reference", None, kind="reference")
    )
    return rows


SEARCH_RATIO = 0.6
"""The search beyond ssToken runs every variant at ssToken's paper ratio (docs/beyond-sstoken.md)."""
SEARCH_BASELINES = ("full", "sstoken-0.6", "sstoken-base-0.6", "rho1-0.6")
"""The rows each variant is compared with (run again in the search's own workdir, same seeds)."""


def search_rows() -> list[MethodRow]:
    """The six pre-registered variants of ssToken (docs/beyond-sstoken.md), at ratio 0.6, EMA history unless
    the variant says otherwise. V3 uses the base history, so it runs where a base exists (pretrained regime)."""
    r = f"{SEARCH_RATIO:g}"

    def variant(key: str, name: str, *settings: str, regimes: tuple[str, ...] = REGIMES) -> MethodRow:
        return MethodRow(
            f"{key}-{r}",
            f"{name} ({r})",
            key,
            "sstoken",
            SEARCH_RATIO,
            ("--model.init_args.ratio", r, *settings),
            ("sstoken", 1),
            regimes=regimes,
        )

    return [
        variant("v1-relative", "V1 relative REL", "--model.init_args.rel_form", "relative"),
        variant("v2-inverted", "V2 inverted REL", "--model.init_args.rel_form", "inverted"),
        variant(
            "v3-eot-base",
            "V3 protected end-of-turn, base history",
            "--model.init_args.keep_end_of_turn",
            "true",
            "--model.init_args.history",
            BASE_HISTORY,
            regimes=("pretrained",),
        ),
        variant("v4-rank", "V4 rank combination", "--model.init_args.combine", "rank"),
        variant(
            "v5-middle-nosink",
            "V5 middle layer, no sink",
            "--model.init_args.attention_layer",
            "middle",
            "--model.init_args.exclude_sink",
            "true",
        ),
        variant(
            "v6-relative-eot",
            "V6 relative REL + protected end-of-turn",
            "--model.init_args.rel_form",
            "relative",
            "--model.init_args.keep_end_of_turn",
            "true",
        ),
    ]


def search_regime_rows(settings: Settings, regime: str) -> list[MethodRow]:
    """The search's rows in `regime`: the baselines of `SEARCH_BASELINES` and the six variants."""
    baselines = [row for row in method_rows(settings) if row.key in SEARCH_BASELINES + ("reference",)]
    return [row for row in baselines + search_rows() if regime in row.regimes]


def regime_rows(settings: Settings, regime: str) -> list[MethodRow]:
    return [
        row
        for row in method_rows(settings)
        if regime in row.regimes and (settings.row_keys is None or row.key in settings.row_keys)
    ]
