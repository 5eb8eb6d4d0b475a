"""`python -m lit_tokensel_bench.real_sft`: see `lit_tokensel_bench.real_sft.run`."""

import sys

from lit_tokensel_bench.real_sft.run import main

if __name__ == "__main__":
    sys.exit(main())
