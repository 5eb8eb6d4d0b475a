"""lit_tokensel's benchmarks, installed with the library (`pip install -e .`): speed and memory scripts
(`python -m lit_tokensel_bench.step_time`, `.throughput`, `.sstoken_cost`) and the showcase benchmarks
(`python -m lit_tokensel_bench.noisy_sft`). Their results live beside the package, in `benchmarks/results/`."""
