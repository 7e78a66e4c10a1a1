"""Fine-tune SAM's mask decoder: `python run.py --train_dir data/train ...` (or `torchrun ... run.py ...`).

The launcher lives in segment_anything/tools/train.py so that `pip install` can give it a command
(`sam-train`); this file keeps the name users and the design card know. Flags: python run.py --help.
"""

from segment_anything.tools.train import main

if __name__ == "__main__":
    main()
