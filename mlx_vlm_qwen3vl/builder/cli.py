"""`mlx-vlm-qwen3vl-checkpoint OUT_DIR`: write a random-weight Qwen3-VL checkpoint."""

import argparse
import sys
import time
from pathlib import Path

from .checkpoint import build_checkpoint, checkpoint_bytes
from .shapes import SHAPES

WARNING = "These are RANDOM weights for testing and benchmarking: the model produces meaningless text."
LARGE_BYTES = 20 << 30


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="mlx-vlm-qwen3vl-checkpoint",
        description=f"Write a Qwen3-VL checkpoint with seeded random weights and the real tokenizer. {WARNING}",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (must be empty unless --force)")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument(
        "--seed", type=int, default=0, help="non-negative; the same seed gives the same bytes"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="default: float32 for tiny, bfloat16 for the real sizes",
    )
    parser.add_argument("--untied", action="store_true", help="write a separate lm_head instead of tying it")
    parser.add_argument("--force", action="store_true", help="write into a non-empty directory")
    return parser.parse_args(argv)


def _gigabytes(n):
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MB"


def main(argv=None):
    args = parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        print(f"error: {args.out_dir} exists and is not a directory", file=sys.stderr)
        return 2
    if args.out_dir.exists() and any(args.out_dir.iterdir()) and not args.force:
        print(f"error: {args.out_dir} is not empty; pass --force to write into it", file=sys.stderr)
        return 2
    tied = False if args.untied else None
    size = checkpoint_bytes(args.shape, args.dtype, tie_word_embeddings=tied)
    if size > LARGE_BYTES:
        print(f"warning: writing {_gigabytes(size)} of weights; this takes a while and needs the disk space")
    start = time.perf_counter()
    out = build_checkpoint(
        args.out_dir, shape=args.shape, seed=args.seed, dtype=args.dtype, tie_word_embeddings=tied
    )
    for path in sorted(out.iterdir()):
        print(f"  {path.name:40s} {_gigabytes(path.stat().st_size):>10s}")
    print(f"wrote {args.shape} checkpoint (seed {args.seed}) to {out} in {time.perf_counter() - start:.1f}s")
    print(f"WARNING: {WARNING}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
