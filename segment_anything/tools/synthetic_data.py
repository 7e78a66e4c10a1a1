"""Write the small synthetic binary-mask dataset used by the demo and the tests.

    python -m segment_anything.tools.synthetic_data demo_data --n 48
"""

import argparse

from ..utils.data import make_synthetic_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to create (images/ + labels/); an existing synthetic set is reused")
    parser.add_argument("--n", type=int, default=48, help="number of image/mask pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_synthetic_dataset(args.root, n=args.n, seed=args.seed)
    print(f"synthetic dataset: {path} ({args.n} pairs)")


if __name__ == "__main__":
    main()
