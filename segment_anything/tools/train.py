"""Fine-tune SAM's mask decoder on your images and masks, on one process or many (`run.py`, `sam-train`).

    torchrun --nproc_per_node 8 run.py --batch_size 8 --model_type vit_h --checkpoint sam_vit_h_4b8939.pth --train_dir data/train
    python run.py --batch_size 8 --dist True ...        # spawns one worker per visible GPU itself
    python run.py --world_size 2 --checkpoint none ...  # no GPU: 2 CPU processes on gloo

Flags: python run.py --help. The run folder gets best.pth (only the trained parameters, loadable
into stock SAM), last.pth (resume state), metrics.jsonl, args.json and train.log.
"""

from segment_anything.training.config import TrainConfig
from segment_anything.training.launch import launch


def main(argv=None) -> None:
    launch(TrainConfig.from_args(argv))


if __name__ == "__main__":
    main()
