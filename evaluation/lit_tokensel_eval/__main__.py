"""`python -m lit_tokensel_eval` is `lit-tokensel-eval`."""

from lit_tokensel_eval.cli import main

main()
