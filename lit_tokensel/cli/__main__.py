"""`python -m lit_tokensel.cli ...`, the same as `lit-tokensel ...`."""

from lit_tokensel.cli import main

main()
