"""Write a small deterministic synthetic dataset (utils/data/synthetic.py) for the demo and the tests.

    python -m segment_anything.tools.synthetic_data demo_data --n 48
    python -m segment_anything.tools.synthetic_data cells --kind instance_map --objects 6
"""

import argparse

from ..utils.data.synthetic import KINDS, make_synthetic_dataset
from ._cli import cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to create; an existing synthetic set with the same options is reused")
    parser.add_argument("--n", type=int, default=48, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", default="folder", choices=KINDS, help="data format to write")
    parser.add_argument("--objects", type=int, default=1, help="objects per image")
    args = parser.parse_args(argv)
    for flag in ("n", "objects"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    path = make_synthetic_dataset(args.root, n=args.n, seed=args.seed, kind=args.kind, objects=args.objects)
    print(f"synthetic dataset: {path} ({args.n} images, {args.kind}, {args.objects} object(s) each)")


def run() -> None:
    """Console entry (sam-synthetic-data): main() through cli(), so bad input and Ctrl-C end in one line."""
    cli(main)


if __name__ == "__main__":
    run()
