"""The training configuration: one dataclass, turned into command-line flags and saved with every run."""

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from ..build_sam import MODEL_TYPES, OFFICIAL_FILES
from ..utils.data.formats import DATA_FORMATS, INSTANCE_MODES
from ..utils.data.prepare import DEFAULT_SEED
from ..utils.image_spec import CHANNELS_HELP, PLANE_HELP, RANGE_HELP, ImageSpec

TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")
INVALID = "invalid configuration:"  # the first line of validate()'s ValueError


def str2bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected one of {TRUE_WORDS + FALSE_WORDS}, got {value!r}")


def adapt_errors(cfg: "TrainConfig") -> List[str]:
    """validate() messages for the loss and what-trains flags."""
    # Imported here: these import torch, and config must stay light to import.
    from ..modeling.lora import parse_targets
    from ..utils.losses import parse_loss
    from ..utils.trainable import parse_parts, plan_errors

    errors = []
    parsed = {}
    if getattr(cfg, "task", "prompt") == "semantic":  # its own terms: ce, dice (utils/semantic_train.py)
        from ..utils.semantic_train import parse_loss
    for name, parse, value in (("loss", parse_loss, cfg.loss), ("train", parse_parts, cfg.train),
                               ("lora_targets", parse_targets, cfg.lora_targets)):
        try:
            parsed[name] = parse(value)
        except ValueError as err:
            errors.append(str(err))
    if cfg.lora_rank < 0:
        errors.append(f"--lora_rank must be >= 0, got {cfg.lora_rank}")
    if not cfg.lora_alpha > 0:
        errors.append(f"--lora_alpha must be > 0, got {cfg.lora_alpha}")
    if cfg.min_region_area < 0:
        errors.append(f"--min_region_area must be >= 0, got {cfg.min_region_area}")
    if cfg.accumulate < 1:
        errors.append(f"--accumulate must be >= 1, got {cfg.accumulate}")
    if "train" in parsed and "lora_targets" in parsed:
        errors.extend(plan_errors(parsed["train"], cfg.lora_rank, parsed["lora_targets"]))
    if cfg.focal_gamma < 0:
        errors.append(f"--focal_gamma must be >= 0, got {cfg.focal_gamma}")
    if cfg.loss_size not in ("original", "low_res"):
        errors.append(f"--loss_size must be original or low_res, got {cfg.loss_size!r}")
    return errors


class FlagParser(argparse.ArgumentParser):
    """argparse with two changes. A value that starts with a minus sign and a digit is a value
    ('--lr -1e-3', '--intensity_range -100,200'), so the check that says what is wrong with it
    speaks, not "expected one argument" (argparse takes only plain negative numbers as values).
    An error is one line, 'error: ...', not the usage block with every flag."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        joined, i = [], 0
        while i < len(args):
            flag, value = args[i], args[i + 1] if i + 1 < len(args) else ""
            if flag.startswith("--") and "=" not in flag and len(value) > 1 and value[0] == "-" and value[1] in "0123456789.":
                joined.append(f"{flag}={value}")
                i += 2
            else:
                joined.append(flag)
                i += 1
        return super().parse_known_args(joined, namespace)

    def error(self, message: str):
        self.exit(2, f"error: {message} (python run.py --help lists the flags)\n")

    def fail(self, errors: List[str]):
        """The configuration's own errors, one line each."""
        self.exit(2, "".join(f"error: {e}\n" for e in errors))


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def compile_errors(cfg: "TrainConfig") -> List[str]:
    """validate() messages for --compile (training/compile.py)."""
    from .compile import compile_errors as errors

    return errors(cfg)


def interactive_errors(cfg: "TrainConfig") -> List[str]:
    """validate() messages for the interactive-training flags."""
    from ..utils.interactive import parse_prompt_probs, parse_val_clicks

    errors = []
    for parse, value in ((parse_prompt_probs, cfg.prompt_probs), (parse_val_clicks, cfg.val_clicks)):
        try:
            parse(value)
        except ValueError as err:
            errors.append(str(err))
    if cfg.click_rounds < 0:
        errors.append(f"--click_rounds must be >= 0, got {cfg.click_rounds}")
    return errors


def attention_errors(cfg: "TrainConfig") -> List[str]:
    """validate() messages for --attention / --fft_blocks."""
    if cfg.attention == "standard":
        return [] if cfg.fft_blocks == "global" else [f"--fft_blocks {cfg.fft_blocks} needs --attention fft"]
    if cfg.attention != "fft":
        return [f"--attention must be standard or fft, got {cfg.attention!r}"]
    if cfg.model_type not in MODEL_TYPES:
        return []  # reported by validate() already
    from ..build_sam import fft_blocks_for

    try:
        fft_blocks_for(cfg.model_type, cfg.fft_blocks)
    except ValueError as err:
        return [str(err)]
    return []


def _flag(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # Distribution
    batch_size: int = _flag(1, "images per process per step")
    dist: bool = _flag(True, "use torch.distributed (one process per GPU, or --world_size CPU processes)")
    port: Optional[int] = _flag(None, "TCP port on 127.0.0.1 for the process group when run.py spawns its own workers (default: a free port)")
    world_size: Optional[int] = _flag(None, "processes to spawn without torchrun (default: visible GPUs, else 1)")
    device: str = _flag("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu", choices=["auto", "cuda", "mps", "cpu"])
    num_workers: Optional[int] = _flag(None, "data-loader workers per process (default: 4 on CUDA, 0 on CPU/MPS)")
    # Processes (launcher, threads, logs)
    threads: Optional[int] = _flag(None, "CPU threads per process (torch.set_num_threads; default: the usable cores less the 1-minute load average, divided by this node's processes, at least 1; the log says the choice)")
    # Model
    model_type: str = _flag("vit_t", "SAM variant", choices=list(MODEL_TYPES))
    checkpoint: Optional[str] = _flag(
        None, "official SAM weights; 'none' = random initialisation (demos, tests); default: the official file name in the current folder"
    )
    image_size: int = _flag(1024, "encoder input side in pixels (multiple of 16); official weights are adapted to it")
    # Data
    train_dir: str = _flag("", "training data folder (see --data_format); COCO uses --train_json + --train_images")
    val_dir: Optional[str] = _flag(None, "validation folder (default: a seeded 80/20 split of train_dir)")
    val_fraction: float = _flag(0.2, "share of train_dir used for validation when --val_dir is absent")
    mask_threshold: int = _flag(127, "JPEG masks: pixel > threshold is foreground")
    # Data formats and checks (utils/data: formats/, checks.py, prepare.py)
    data_format: str = _flag("auto", "auto (folder, objects or labelme from the folder; coco from --train_json), "
                             "folder, objects, instance_map, labelme or coco", choices=list(DATA_FORMATS))
    instance_mode: str = _flag("per_object", "per_object: every object its own prompt and target (folder: each "
                               "connected component); per_image: one box around all foreground (the reference)",
                               choices=list(INSTANCE_MODES))
    min_area: int = _flag(0, "objects with fewer pixels are dropped (and counted in the log)")
    labels: Optional[str] = _flag(None, "labelme: comma-separated labels to keep (default: all)")
    categories: Optional[str] = _flag(None, "coco: comma-separated category names to keep (default: all)")
    train_json: Optional[str] = _flag(None, "coco: instances JSON of the training images")
    train_images: Optional[str] = _flag(None, "coco: folder of the training images")
    val_json: Optional[str] = _flag(None, "coco: instances JSON of the validation images (default: a seeded split)")
    val_images: Optional[str] = _flag(None, "coco: folder of the validation images")
    foreground_values: Optional[str] = _flag(None, "mask values that are the object, e.g. 1,2 (palette indices, "
                                             "label values); class names for labelme/coco")
    intensity_range: str = _flag("auto", RANGE_HELP)
    channels: str = _flag("", CHANNELS_HELP)
    plane: Optional[int] = _flag(None, PLANE_HELP)
    skip_bad: bool = _flag(False, "leave bad samples out with a warning (list in <run>/skipped.txt) instead of stopping")
    # Objects, prompts, augmentation (utils/data/dataset.py, prompts.py, augment.py)
    max_objects: int = _flag(16, "objects per image per training step (a fresh seeded choice each epoch); "
                             "validation decodes every object in chunks of this size")
    prompt: str = _flag("box", "prompt per object: box, point, box+point, or mixed (per object a box or points, "
                        "drawn with --prompt_probs; validation uses boxes)", choices=["box", "point", "box+point", "mixed"])
    num_points: int = _flag(1, "positive points per object with --prompt point or box+point")
    point_mode: str = _flag("center", "center (deepest pixel inside the object, then spread) or random "
                            "(uniform over its pixels)", choices=["center", "random"])
    negative_points: int = _flag(0, "background points per object, drawn inside its box, with --prompt point or box+point")
    box_jitter: float = _flag(0.0, "training only: each box side moves by up to this fraction of the box side, in [0, 0.5)")
    augment: str = _flag("", "training augmentation, comma-separated: flip, rot90, scale, color (default: none)")
    # Optimisation
    epoch: int = _flag(10, "training epochs")
    lr: float = _flag(2e-4, "AdamW peak learning rate (cosine schedule stepped per iteration)")
    weight_decay: float = _flag(0.01, "AdamW weight decay")
    amp: str = _flag("auto", "mixed precision: auto (bf16/fp16 on CUDA, off elsewhere), bf16, fp16 or off", choices=["auto", "bf16", "fp16", "off"])
    patience: int = _flag(0, "stop after this many epochs without a better validation IoU (0 = never)")
    seed: int = _flag(DEFAULT_SEED, "random seed (data split, shuffling)")
    # What trains and the loss (logic in utils/trainable.py and utils/losses.py)
    loss: str = _flag("bce=1,iou=1,iou_head=1", "weighted loss terms: bce, focal, dice, iou (soft IoU), iou_head (MSE of the IoU prediction); "
                      "--task semantic: ce, dice (this default then means ce=1)")
    focal_alpha: float = _flag(0.25, "focal loss: weight of the foreground class (negative = no class weighting)")
    focal_gamma: float = _flag(2.0, "focal loss: focusing exponent")
    train: str = _flag("mask_decoder", "parts that train: mask_decoder, prompt_encoder, image_encoder, a comma-separated set, or all")
    lora_rank: int = _flag(0, "rank of LoRA adapters on the image encoder's attention (0 = off); the encoder's weights stay frozen")
    lora_alpha: float = _flag(8.0, "LoRA scaling numerator: the update is lora_alpha / lora_rank * B A")
    lora_targets: str = _flag("qkv,proj", "layers that get adapters: qkv, proj (image encoder attention), decoder (the mask decoder's attention projections)")
    lora_save: str = _flag("merged", "best.pth holds the adapters merged into stock weights, or the adapter tensors only",
                           choices=["merged", "adapters"])
    grad_checkpoint: bool = _flag(False, "recompute the image encoder's blocks in the backward pass (less memory when the encoder trains)")
    accumulate: int = _flag(1, "accumulate gradients over this many steps (K steps of batch B train as one of batch K*B)")
    min_region_area: int = _flag(0, "validation also reports IoU/Dice after filling holes and removing islands smaller than this (pixels; 0 = off)")
    loss_size: str = _flag("original", "compute the loss at each image's original size or on the decoder's low-resolution grid",
                           choices=["original", "low_res"])
    # FFT token mixing (logic in modeling/fft_attention.py, built by build_sam)
    attention: str = _flag("standard", "image encoder token mixing: standard self-attention, or fft (an O(N log N) "
                           "FFT mixer in the --fft_blocks; vit_b/l/h only)", choices=["standard", "fft"])
    fft_blocks: str = _flag("global", "with --attention fft, the blocks that mix by FFT: global (the global-attention "
                            "blocks), all, or block indices such as 2,5")
    # Semantic segmentation (utils/semantic_train.py, training/tasks/semantic.py, modeling/semantic_head.py)
    task: str = _flag("prompt", "prompt: SAM's promptable masks (the mask decoder); semantic: a K-class segmentation head "
                      "on the image-encoder features, cross-entropy (--loss ce=1[,dice=1])", choices=["prompt", "semantic"])
    num_classes: Optional[int] = _flag(None, "--task semantic: classes including background (default: from the data; "
                                       "instance_map label values are class ids)")
    # Evaluation (the evaluate tool is segment_anything/tools/evaluate.py)
    eval_base: bool = _flag(True, "score the starting model on the validation set before the first epoch (epoch 0 in metrics.jsonl)")
    # Embedding cache: frozen-encoder embeddings computed once, read in later epochs and runs
    cache_dir: Optional[str] = _flag(None, "embedding cache folder (default: $XDG_CACHE_HOME/sam_finetune/embeddings, i.e. ~/.cache/sam_finetune/embeddings)")
    cache_dtype: str = _flag("fp16", "precision of cached embeddings: fp16, bf16 or fp32", choices=["fp16", "bf16", "fp32"])
    no_cache: bool = _flag(False, "compute the image embedding on every step (no embedding cache)")
    cache_max_gb: float = _flag(0.0, "bound the embedding cache folder to this many GB, least recently used entries removed first (0: no bound)")
    # Compiled step (logic in training/compile.py)
    compile: bool = _flag(False, "torch.compile the per-step prompt encoder + mask decoder (dynamic shapes); "
                          "falls back to eager with a warning if compiling fails")
    # Interactive training (logic in utils/interactive.py, utils/click_eval.py)
    prompt_probs: str = _flag("box=0.5,point=0.5", "--prompt mixed: per object a box or 1..--num_points positive points, "
                              "with these probabilities")
    multimask: bool = _flag(True, "single-point prompts train the three multimask outputs, back-propagating the one with "
                            "the lowest loss (SAM's training); ignored (false) when no prompt is a single point")
    click_rounds: int = _flag(0, "after the first prediction, up to this many corrective clicks per step (drawn per step), "
                              "the previous logits as mask prompt, then one round with the mask prompt only (0 = off)")
    click_mode: str = _flag("center", "corrective click at the deepest pixel of the larger error region, or a random pixel of it",
                            choices=["center", "random"])
    click_grad: str = _flag("all", "every click round back-propagates its loss, or only the last (less memory)",
                            choices=["all", "last"])
    val_clicks: str = _flag("", "validation IoU after these numbers of corrective clicks, e.g. 1,3,5, from a point and from a box "
                            "(metrics.jsonl val_point_click<k>_iou, val_box_click<k>_iou); off by default: every object then gets "
                            "a decoder pass per click from each start, which makes validation several times slower")
    # Output
    output_dir: Optional[str] = _flag(None, "run folder (default: runs/<timestamp>); an existing run is never overwritten")
    resume: Optional[str] = _flag(
        None, "continue from a last.pth, a run folder holding one, or 'auto' (--output_dir's); alone, it takes the run's saved flags")
    # Fault tolerance (training/resume.py, training/faults.py)
    save_every: int = _flag(0, "also write last.pth every N optimizer steps (0 = only by time and at epoch ends)")
    save_every_minutes: float = _flag(10.0, "also write last.pth every M minutes of training (0 = off)")
    resume_relaxed: bool = _flag(False, "allow --resume with another world size: schedule recomputed, data order and RNG not reproduced")
    max_bad_steps: int = _flag(10, "stop when more than this many optimizer steps in a row have a non-finite loss or gradient")
    dist_timeout: float = _flag(1800.0, "seconds a collective waits for a dead or hung rank before every rank stops")

    def __post_init__(self) -> None:
        from ..utils.interactive import single_point_prompts  # here: it imports torch

        self.validate()
        # Stored as it acts: the multimask heads train (utils/trainable.py) only when it is true.
        self.multimask = bool(self.multimask) and single_point_prompts(self)

    def validate(self) -> None:
        errors: List[str] = []
        if self.batch_size < 1:
            errors.append(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.model_type not in MODEL_TYPES:
            errors.append(f"--model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.image_size < 16 or self.image_size % 16:
            errors.append(f"--image_size must be a positive multiple of 16, got {self.image_size}")
        if self.epoch < 1:
            errors.append(f"--epoch must be >= 1, got {self.epoch}")
        if not self.lr > 0:
            errors.append(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            errors.append(f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.mask_threshold < 255:
            errors.append(f"--mask_threshold must be in [0, 254], got {self.mask_threshold}")
        if self.min_area < 0:
            errors.append(f"--min_area must be >= 0, got {self.min_area}")
        try:
            ImageSpec.from_flags(self.channels, self.intensity_range, self.plane)
        except ValueError as err:
            errors.append(str(err))
        if self.world_size is not None and self.world_size < 1:
            errors.append(f"--world_size must be >= 1, got {self.world_size}")
        if self.threads is not None and self.threads < 1:
            errors.append(f"--threads must be >= 1, got {self.threads}")
        if self.port is not None and not 0 < self.port < 65536:
            errors.append(f"--port must be a TCP port, got {self.port}")
        if self.patience < 0:
            errors.append(f"--patience must be >= 0, got {self.patience}")
        errors.extend(adapt_errors(self))
        if self.save_every < 0 or self.save_every_minutes < 0:
            errors.append(f"--save_every and --save_every_minutes must be >= 0, got {self.save_every}, {self.save_every_minutes}")
        if self.max_bad_steps < 0:
            errors.append(f"--max_bad_steps must be >= 0, got {self.max_bad_steps}")
        if not self.dist_timeout > 0:
            errors.append(f"--dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        errors.extend(interactive_errors(self))
        errors.extend(attention_errors(self))
        errors += self._prompt_errors()
        errors.extend(compile_errors(self))
        errors += self._semantic_errors()
        if errors:
            raise ValueError(f"{INVALID}\n  " + "\n  ".join(errors))

    def _prompt_errors(self) -> List[str]:
        from ..utils.data.augment import parse_augment  # light: albumentations loads only when used

        errors = []
        if self.max_objects < 1:
            errors.append(f"--max_objects must be >= 1, got {self.max_objects}")
        if self.num_points < 0 or self.negative_points < 0:
            errors.append(f"--num_points and --negative_points must be >= 0, got {self.num_points}, "
                          f"{self.negative_points}")
        if self.prompt in ("point", "mixed") and self.num_points < 1:
            errors.append(f"--prompt {self.prompt} needs --num_points >= 1, got {self.num_points}")
        if self.prompt == "box" and self.negative_points:
            errors.append("--negative_points needs --prompt point or box+point (box prompts carry no points)")
        if not 0.0 <= self.box_jitter < 0.5:
            errors.append(f"--box_jitter must be in [0, 0.5), got {self.box_jitter}")
        try:
            parse_augment(self.augment)
        except ValueError as err:
            errors.append(f"--augment: {err}")
        return errors

    def _semantic_errors(self) -> List[str]:
        if self.task != "semantic":
            return ["--num_classes needs --task semantic"] if self.num_classes is not None else []
        errors = []
        if self.num_classes is not None and self.num_classes < 2:
            errors.append(f"--num_classes must be >= 2 (background and one class), got {self.num_classes}")
        if self.prompt != "box" or self.click_rounds or self.negative_points or self.box_jitter:
            errors.append("--task semantic takes no prompts: leave --prompt, --click_rounds, --negative_points and "
                          "--box_jitter at their defaults")
        if self.augment:
            errors.append("--augment is not available with --task semantic yet")
        if self.instance_mode != "per_object":
            errors.append("--instance_mode per_image has no meaning with --task semantic (targets are class maps)")
        return errors

    @property
    def random_init(self) -> bool:
        return self.checkpoint is not None and self.checkpoint.lower() == "none"

    def checkpoint_path(self) -> Optional[str]:
        """The weights to start from, or None for random initialisation."""
        if self.random_init:
            return None
        return self.checkpoint or OFFICIAL_FILES[self.model_type]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = FlagParser(
            description="Fine-tune SAM's mask decoder with box and/or point prompts, on one or many processes.",
            formatter_class=_DefaultsOnce,
        )
        for f in fields(cls):
            kw: Dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if f.type in (bool, "bool"):
                # --skip_bad alone means true; --skip_bad True / --dist no still take a value.
                kw.update(type=str2bool, metavar="BOOL", nargs="?", const=True)
            elif f.type in (int, "int", Optional[int], "Optional[int]"):
                kw["type"] = int
            elif f.type in (float, "float"):
                kw["type"] = float
            parser.add_argument(f"--{f.name}", **kw)
        return parser

    @classmethod
    def from_args(cls, argv: Optional[List[str]] = None) -> "TrainConfig":
        parser = cls.parser()
        args = parser.parse_args(argv)
        if args.resume:
            # --resume RUN alone continues with the run's saved flags; flags given beside it win
            # and then go through the resume checks (checkpoint.check_resume).
            # auto becomes the run folder, or None: a new run (resume.resolve_resume).
            from .resume import resolve_resume, saved_args

            try:
                resume = resolve_resume(args.resume, args.output_dir)
                if resume:
                    parser.set_defaults(**saved_args(resume, args.output_dir))
            except (OSError, ValueError) as err:
                parser.fail([str(err)])
            args = parser.parse_args(argv)
            args.resume = resume
        try:
            return cls(**vars(args))
        except ValueError as err:
            lines = str(err).splitlines()
            parser.fail([line.strip() for line in lines[1:]] if lines[0] == INVALID else lines)
            raise  # unreachable: parser.fail exits
