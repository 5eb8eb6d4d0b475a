"""Benchmarks of lit_tokensel: speed/memory scripts (`python benchmarks/<name>.py`) and showcase benchmarks
(`benchmarks.noisy_sft`), importable from the repository root."""
