"""Command line: write a sharded (DCP) checkpoint folder of an FSDP2 run as one Lightning checkpoint file.

    python -m lit_tokensel.distributed.consolidate runs/.../last.ckpt consolidated.ckpt

The file loads with `torch.load`, `LightningModule.load_from_checkpoint` and `lit-tokensel export`,
and an FSDP2 run can resume from it (`--ckpt_path consolidated.ckpt`), EMA history included.
"""

from __future__ import annotations

import argparse

from lit_tokensel.distributed.checkpoint import consolidate_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Consolidate a sharded (DCP) checkpoint folder into one file."
    )
    parser.add_argument("checkpoint", help="DCP checkpoint folder (e.g. runs/.../last.ckpt)")
    parser.add_argument("output_file", help="Path of the single-file checkpoint to write")
    args = parser.parse_args(argv)
    consolidate_checkpoint(args.checkpoint, args.output_file)
    print(f"consolidated {args.checkpoint} -> {args.output_file}")


if __name__ == "__main__":
    main()
