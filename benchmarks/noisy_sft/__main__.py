"""`python -m benchmarks.noisy_sft`: see `benchmarks.noisy_sft.run`."""

import sys

from benchmarks.noisy_sft.run import main

if __name__ == "__main__":
    sys.exit(main())
