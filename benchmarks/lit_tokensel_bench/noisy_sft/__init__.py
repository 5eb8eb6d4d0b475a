"""Noisy-SFT showcase: do token-selection methods drop the corrupted tokens of a noisy SFT set?

`lit_tokensel_bench.noisy_sft.data` generates the data (clean base/reference sets, the noisy training set with
every corrupted character span recorded, and the clean test documents of the `noisy_sft_*` lm-eval tasks).
"""
