"""The real-data study: every method against full SFT on real instruction data, scored on the offline
suite and an AlpacaEval answer-NLL proxy (`python -m lit_tokensel_bench.real_sft`)."""
