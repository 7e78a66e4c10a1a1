"""The training configuration: flat flags (grouped by section in their metadata, and so in --help),
saved with every run as args.json, and resolved once into the typed specs the run uses (RunSpec).

TrainConfig holds the flags exactly as given; resolve() parses and checks them together and
returns a RunSpec, or raises one ValueError listing every problem. A TrainConfig that exists has
resolved once: validation is "resolve succeeds".
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..build_sam import MODEL_TYPES, OFFICIAL_FILES, fft_blocks_for, image_size_errors
from ..modeling.lora import parse_targets
from ..utils.data.augment import parse_augment
from ..utils.data.cache import INPUT_FLAGS, CacheSpec
from ..utils.data.dataset import DatasetSpec
from ..utils.data.formats import DATA_FLAGS, DATA_FORMATS, INSTANCE_MODES, DataOptions, option_errors
from ..utils.data.prepare import DEFAULT_SEED, DataSources
from ..utils.data.prompts import PromptConfig
from ..utils.image_spec import CHANNELS_HELP, PLANE_HELP, RANGE_HELP, ImageSpec, plane_flag
from ..utils.interactive import InteractiveSpec, parse_prompt_probs, parse_val_clicks
from ..utils.losses import LossSpec, parse_loss
from ..utils.semantic_train import SemanticLoss
from ..utils.semantic_train import parse_loss as parse_semantic_loss
from ..utils.tiles import check_tiling
from ..utils.trainable import TrainPlan, parse_parts, plan_errors
from .compile import compile_errors
from .resume import restart_problem, resolve_resume, saved_args

TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")
INVALID = "invalid configuration:"  # the first line of validate()'s ValueError
TASKS = ("prompt", "interactive", "semantic")  # what RunSpec.task can be (--task takes prompt or semantic)


def str2bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected one of {TRUE_WORDS + FALSE_WORDS}, got {value!r}")


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


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


def _section(title: str) -> Callable[..., Any]:
    """The flag maker of one section: its fields carry metadata 'section' (their --help group)."""

    def flag(default: Any, help: str, **kw: Any) -> Any:
        return field(default=default, metadata={"help": help, "section": title, **kw})

    return flag


DISTRIBUTION = _section("distribution")
PROCESSES = _section("processes (launcher, threads, logs)")
MODEL = _section("model")
DATA = _section("data")
FORMATS = _section("data formats and checks")
PROMPTS = _section("objects, prompts, augmentation")
OPTIMISATION = _section("optimisation")
ADAPTATION = _section("what trains and the loss")
FFT = _section("FFT token mixing")
SEMANTIC = _section("semantic segmentation")
EVALUATION = _section("evaluation")
CACHE = _section("embedding cache")
COMPILE = _section("compiled step")
INTERACTIVE = _section("interactive training")
OUTPUT = _section("output")
FAULTS = _section("fault tolerance")


@dataclass(frozen=True)
class FaultSpec:
    """What training/faults.py acts on."""

    save_every: int  # optimizer steps between mid-epoch saves (0: off)
    save_every_minutes: float  # minutes between mid-epoch saves (0: off)
    max_bad_steps: int  # non-finite steps in a row before the run stops
    dist_timeout: float  # seconds a collective waits for a lost rank


@dataclass(frozen=True)
class RunSpec:
    """The flags resolved once: what each part of a run needs, parsed and typed."""

    task: str  # one of TASKS
    plan: TrainPlan  # what trains
    loss: Union[LossSpec, SemanticLoss]  # the task's loss (keys(): 'loss', then the named terms)
    interactive: Optional[InteractiveSpec]  # mixed prompts, multimask minimum, click rounds; None when off
    val_clicks: Tuple[int, ...]  # validation IoU after these numbers of corrective clicks
    augment: Tuple[str, ...]  # training augmentation
    faults: FaultSpec
    data: DataSources  # where the data is and how it is read
    datasets: DatasetSpec  # prompts, objects per item, augmentation
    cache: CacheSpec  # the embedding cache


@dataclass(eq=False)
class TrainConfig:
    batch_size: int = DISTRIBUTION(1, "images per process per step")
    objects_per_step: int = DISTRIBUTION(0, "fill each process's step with this many objects on average instead of --batch_size "
                                         "images (0 = off): images packed in a seeded order, one with more objects split "
                                         "across steps, every object once per epoch, steps cut at equal estimated cost (an "
                                         "object weighs more with the loss on a larger image), so ranks do equal work; "
                                         "--max_objects then sets only the validation chunks; with --accumulate K a step "
                                         "trains K x this")
    dist: bool = DISTRIBUTION(True, "use torch.distributed (one process per GPU, or --world_size CPU processes)")
    port: Optional[int] = DISTRIBUTION(None, "TCP port on 127.0.0.1 for the process group when run.py spawns its own workers (default: a free port)")
    world_size: Optional[int] = DISTRIBUTION(None, "processes to spawn without torchrun (default: visible GPUs, else 1)")
    device: str = DISTRIBUTION("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu", choices=["auto", "cuda", "mps", "cpu"])
    num_workers: Optional[int] = DISTRIBUTION(None, "data-loader workers per process (default: 4 on CUDA, 0 on CPU/MPS)")
    threads: Optional[int] = PROCESSES(None, "CPU threads per process (torch.set_num_threads; default: OMP_NUM_THREADS if set, else the usable cores less the 1-minute load average, divided by this node's processes, at least 1; the log says the choice)")
    model_type: str = MODEL("vit_t", "SAM variant", choices=list(MODEL_TYPES))
    checkpoint: Optional[str] = MODEL(
        None, "official SAM weights; 'none' = random initialisation (demos, tests); default: the official file name in the current folder"
    )
    image_size: int = MODEL(1024, "encoder input side in pixels (multiple of 16); official weights are adapted to it")
    train_dir: str = DATA("", "training data folder (see --data_format); COCO uses --train_json + --train_images")
    val_dir: Optional[str] = DATA(None, "validation folder (default: a seeded 80/20 split of train_dir)")
    val_fraction: float = DATA(0.2, "share of train_dir used for validation when --val_dir is absent")
    mask_threshold: int = DATA(127, "JPEG masks: pixel > threshold is foreground")
    tile: int = DATA(0, "cut images larger than this many pixels into overlapping tiles of this side, each one training "
                        "item seen at full resolution (the grid of tiled inference; 0 = off: each image resized whole)")
    tile_overlap: int = DATA(128, "--tile: pixels shared by neighbouring tiles; objects up to this size fit wholly in one tile")
    tile_min_visible: float = DATA(0.5, "--tile: an object cut by tile borders trains (its visible part) in the tile holding most "
                                        "of it when that is at least this share of its area; other parts are left out of the loss")
    data_format: str = FORMATS("auto", "auto (folder, objects or labelme from the folder; coco from --train_json), "
                             "folder, objects, instance_map, labelme or coco", choices=list(DATA_FORMATS))
    instance_mode: str = FORMATS("per_object", "per_object: every object its own prompt and target (folder: each "
                               "connected component); per_image: one box around all foreground (the reference)",
                               choices=list(INSTANCE_MODES))
    min_area: int = FORMATS(0, "objects with fewer pixels are dropped (and counted in the log)")
    labels: Optional[str] = FORMATS(None, "labelme: comma-separated labels to keep (default: all)")
    categories: Optional[str] = FORMATS(None, "coco: comma-separated category names to keep (default: all)")
    train_json: Optional[str] = FORMATS(None, "coco: instances JSON of the training images")
    train_images: Optional[str] = FORMATS(None, "coco: folder of the training images")
    val_json: Optional[str] = FORMATS(None, "coco: instances JSON of the validation images (default: a seeded split)")
    val_images: Optional[str] = FORMATS(None, "coco: folder of the validation images")
    foreground_values: Optional[str] = FORMATS(None, "mask values that are the object, e.g. 1,2 (palette indices, "
                                             "label values); class names for labelme/coco")
    intensity_range: str = FORMATS("auto", RANGE_HELP)
    channels: str = FORMATS("", CHANNELS_HELP)
    plane: Union[int, str, None] = FORMATS(None, PLANE_HELP, type=plane_flag)
    skip_bad: bool = FORMATS(False, "leave bad samples out with a warning (list in <run>/skipped.txt) instead of stopping")
    max_objects: int = PROMPTS(16, "objects per image per training step (a fresh seeded choice each epoch); "
                             "validation decodes every object in chunks of this size")
    prompt: str = PROMPTS("box", "prompt per object: box, point, box+point, or mixed (per object a box or points, "
                        "drawn with --prompt_probs; validation uses boxes)", choices=["box", "point", "box+point", "mixed"])
    num_points: int = PROMPTS(1, "positive points per object with --prompt point or box+point")
    point_mode: str = PROMPTS("center", "center (deepest pixel inside the object, then spread) or random "
                            "(uniform over its pixels)", choices=["center", "random"])
    negative_points: int = PROMPTS(0, "background points per object, drawn inside its box, with --prompt point or box+point")
    box_jitter: float = PROMPTS(0.0, "training only: each box side moves by up to this fraction of the box side, in [0, 0.5)")
    augment: str = PROMPTS("", "training augmentation, comma-separated: flip, rot90, scale, color (default: none)")
    epoch: int = OPTIMISATION(10, "training epochs")
    lr: float = OPTIMISATION(2e-4, "AdamW peak learning rate (cosine schedule stepped per iteration)")
    weight_decay: float = OPTIMISATION(0.01, "AdamW weight decay")
    amp: str = OPTIMISATION("auto", "mixed precision: auto (bf16/fp16 on CUDA, off elsewhere), bf16, fp16 or off", choices=["auto", "bf16", "fp16", "off"])
    patience: int = OPTIMISATION(0, "stop after this many epochs without a better validation IoU (0 = never)")
    seed: int = OPTIMISATION(DEFAULT_SEED, "random seed (data split, shuffling)")
    loss: str = ADAPTATION("bce=1,iou=1,iou_head=1", "weighted loss terms: bce, focal, dice, iou (soft IoU), iou_head (MSE of the IoU prediction); "
                      "--task semantic: ce, dice (this default then means ce=1)")
    focal_alpha: float = ADAPTATION(0.25, "focal loss: weight of the foreground class (negative = no class weighting)")
    focal_gamma: float = ADAPTATION(2.0, "focal loss: focusing exponent")
    train: str = ADAPTATION("mask_decoder", "parts that train: mask_decoder, prompt_encoder, image_encoder, a comma-separated set, or all")
    lora_rank: int = ADAPTATION(0, "rank of LoRA adapters on the image encoder's attention (0 = off); the encoder's weights stay frozen")
    lora_alpha: float = ADAPTATION(8.0, "LoRA scaling numerator: the update is lora_alpha / lora_rank * B A")
    lora_targets: str = ADAPTATION("qkv,proj", "layers that get adapters: qkv, proj (image encoder attention), decoder (the mask decoder's attention projections)")
    lora_save: str = ADAPTATION("merged", "best.pth holds the adapters merged into stock weights, or the adapter tensors only",
                           choices=["merged", "adapters"])
    grad_checkpoint: bool = ADAPTATION(False, "recompute the image encoder's blocks in the backward pass (less memory when the encoder trains)")
    accumulate: int = ADAPTATION(1, "accumulate gradients over this many steps (K steps of batch B train as one of batch K*B)")
    min_region_area: int = ADAPTATION(0, "validation also reports IoU/Dice after filling holes and removing islands smaller than this (pixels; 0 = off)")
    distill: float = ADAPTATION(0.0, "keep the starting model's answers to other prompts: adds this weight x the mean squared "
                           "difference of the tuned and the starting model's low-resolution logits on --distill_prompts random "
                           "boxes and points per image (MSE on logits: a gradient even where both are confident; 0 = off)")
    distill_prompts: int = ADAPTATION(4, "--distill: off-target prompts per image, half boxes and half single points, "
                                   "drawn per image and epoch")
    l2sp: float = ADAPTATION(0.0, "adds this weight x the squared distance of the trained parameters to their starting values "
                        "(L2-SP; with LoRA: of the adapter factors to their start; 0 = off)")
    loss_size: str = ADAPTATION("original", "compute the loss at each image's original size or on the decoder's low-resolution grid",
                           choices=["original", "low_res"])
    attention: str = FFT("standard", "image encoder token mixing: standard self-attention, or fft (an O(N log N) "
                           "FFT mixer in the --fft_blocks; vit_b/l/h only)", choices=["standard", "fft"])
    fft_blocks: str = FFT("global", "with --attention fft, the blocks that mix by FFT: global (the global-attention "
                            "blocks), all, or block indices such as 2,5")
    task: str = SEMANTIC("prompt", "prompt: SAM's promptable masks (the mask decoder); semantic: a K-class segmentation head "
                      "on the image-encoder features, cross-entropy (--loss ce=1[,dice=1])", choices=["prompt", "semantic"])
    num_classes: Optional[int] = SEMANTIC(None, "--task semantic: classes including background (default: from the data; "
                                       "instance_map label values are class ids)")
    eval_base: bool = EVALUATION(True, "score the starting model on the validation set before the first epoch (epoch 0 in metrics.jsonl)")
    cache_dir: Optional[str] = CACHE(None, "embedding cache folder (default: $XDG_CACHE_HOME/sam_finetune/embeddings, i.e. ~/.cache/sam_finetune/embeddings)")
    cache_dtype: str = CACHE("fp16", "precision of cached embeddings: fp16, bf16 or fp32", choices=["fp16", "bf16", "fp32"])
    no_cache: bool = CACHE(False, "compute the image embedding on every step (no embedding cache)")
    cache_max_gb: float = CACHE(0.0, "bound the embedding cache folder to this many GB, least recently used entries removed first (0: no bound)")
    compile: bool = COMPILE(False, "torch.compile the per-step prompt encoder + mask decoder (dynamic shapes); "
                          "falls back to eager with a warning if compiling fails")
    prompt_probs: str = INTERACTIVE("box=0.5,point=0.5", "--prompt mixed: per object a box or 1..--num_points positive points, "
                              "with these probabilities")
    multimask: bool = INTERACTIVE(True, "single-point prompts train the three multimask outputs, back-propagating the one with "
                            "the lowest loss (SAM's training); ignored (false) when no prompt is a single point")
    click_rounds: int = INTERACTIVE(0, "after the first prediction, up to this many corrective clicks per step (drawn per step), "
                              "the previous logits as mask prompt, then one round with the mask prompt only (0 = off)")
    click_mode: str = INTERACTIVE("center", "corrective click at the deepest pixel of the larger error region, or a random pixel of it",
                            choices=["center", "random"])
    click_grad: str = INTERACTIVE("all", "every click round back-propagates its loss, or only the last (less memory)",
                            choices=["all", "last"])
    val_clicks: str = INTERACTIVE("", "validation IoU after these numbers of corrective clicks, e.g. 1,3,5, from a point and from a box "
                            "(metrics.jsonl val_point_click<k>_iou, val_box_click<k>_iou); off by default: every object then gets "
                            "a decoder pass per click from each start, which makes validation several times slower")
    output_dir: Optional[str] = OUTPUT(None, "run folder (default: runs/<timestamp>); an existing run is never overwritten")
    resume: Optional[str] = OUTPUT(
        None, "continue from a last.pth, a run folder holding one, or 'auto' (--output_dir's); alone, it takes the run's saved flags")
    save_every: int = FAULTS(0, "also write last.pth every N optimizer steps (0 = only by time and at epoch ends)")
    save_every_minutes: float = FAULTS(10.0, "also write last.pth every M minutes of training (0 = off)")
    resume_relaxed: bool = FAULTS(False, "allow --resume on a world size that cannot keep the run's global batch: schedule recomputed, "
                                  "data order and RNG not reproduced (one that can keep it continues exactly, --accumulate chosen to fit)")
    max_bad_steps: int = FAULTS(10, "stop when more than this many optimizer steps in a row have a non-finite loss or gradient")
    dist_timeout: float = FAULTS(1800.0, "seconds a collective waits for a dead or hung rank before every rank stops")


    def __post_init__(self) -> None:
        self.resolve()  # a configuration that exists is one that resolves

    def validate(self) -> None:
        """Raise the ValueError of resolve() when the flags do not resolve."""
        self.resolve()

    def resolve(self) -> RunSpec:
        """The flags parsed and checked together; one ValueError naming every problem."""
        errors = self._range_errors()
        loss_parser = parse_semantic_loss if self.task == "semantic" else parse_loss
        loss_weights = _parsed(loss_parser, self.loss, errors)
        parts = _parsed(parse_parts, self.train, errors)
        targets = _parsed(parse_targets, self.lora_targets, errors)
        errors += self._adaptation_errors()
        if parts is not None and targets is not None:
            errors.extend(plan_errors(parts, self.lora_rank, targets))
        if self.focal_gamma < 0:
            errors.append(f"--focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.loss_size not in ("original", "low_res"):
            errors.append(f"--loss_size must be original or low_res, got {self.loss_size!r}")
        errors += self._fault_errors()
        probs = _parsed(parse_prompt_probs, self.prompt_probs, errors)
        errors += self._anchor_errors(probs)
        val_clicks = _parsed(parse_val_clicks, self.val_clicks, errors)
        if self.click_rounds < 0:
            errors.append(f"--click_rounds must be >= 0, got {self.click_rounds}")
        errors += self._attention_errors()
        errors += self._prompt_errors()
        augment = _parsed(parse_augment, self.augment, errors, prefix="--augment: ")
        errors.extend(compile_errors(self))
        errors += self._semantic_errors()
        errors += self._tile_errors()
        if errors:
            raise ValueError(f"{INVALID}\n  " + "\n  ".join(errors))
        multimask = self.multimask and self._single_point_prompts(probs)
        interactive = self._interactive(probs, multimask)
        if self.task == "semantic":
            task, loss = "semantic", SemanticLoss(loss_weights)
        else:
            task = "prompt" if interactive is None else "interactive"
            loss = LossSpec(loss_weights, self.focal_alpha, self.focal_gamma, self.loss_size, distill=self.distill,
                            distill_prompts=self.distill_prompts, l2sp=self.l2sp)
        plan = TrainPlan(parts=parts, prompt=self.prompt, multimask=multimask, mask_prompt=self.click_rounds > 0,
                         lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=tuple(targets),
                         grad_checkpoint=self.grad_checkpoint)
        faults = FaultSpec(self.save_every, self.save_every_minutes, self.max_bad_steps, self.dist_timeout)
        return RunSpec(task, plan, loss, interactive, val_clicks, augment, faults, *self._data_specs(augment))

    def _data_specs(self, augment: Tuple[str, ...]) -> Tuple[DataSources, DatasetSpec, CacheSpec]:
        """The data, dataset and cache specs. --prompt mixed: training items carry both the box and
        the points of every object (the interactive step picks one per object); validation items
        carry boxes, the prompt users give most."""
        options = DataOptions.from_flags(**{name: getattr(self, name) for name in DATA_FLAGS})
        data = DataSources(options, self.train_dir, self.train_json, self.train_images, self.val_dir, self.val_json,
                           self.val_images, self.val_fraction, self.seed, self.skip_bad)
        prompts = [PromptConfig(prompt, self.num_points, self.point_mode,
                                self.negative_points if prompt != "box" else 0, self.box_jitter)
                   for prompt in (("box+point", "box") if self.prompt == "mixed" else (self.prompt,) * 2)]
        datasets = DatasetSpec(self.image_size, *prompts, self.max_objects, augment, self.seed,
                               self.distill_prompts if self.distill > 0 else 0)
        cache = CacheSpec({name: getattr(self, name) for name in INPUT_FLAGS}, not self.no_cache, self.augment,
                          self.cache_dir, self.cache_dtype, self.cache_max_gb)
        return data, datasets, cache

    def _single_point_prompts(self, probs: Dict[str, float]) -> bool:
        """True when a run can give an object exactly one positive point and nothing else: the
        prompts SAM answers with three masks (so only then do the multimask outputs train)."""
        if self.prompt == "mixed":
            return probs["point"] > 0 and self.negative_points == 0
        return self.prompt == "point" and self.num_points == 1 and self.negative_points == 0

    def _interactive(self, probs: Dict[str, float], multimask: bool) -> Optional[InteractiveSpec]:
        mixed = (probs["box"], probs["point"]) if self.prompt == "mixed" else None
        if mixed is None and not multimask and self.click_rounds == 0:
            return None
        return InteractiveSpec(self.seed, mixed, self.num_points, multimask, self.click_rounds, self.click_mode,
                               self.click_grad)

    def _range_errors(self) -> List[str]:
        errors: List[str] = []
        if self.batch_size < 1:
            errors.append(f"--batch_size must be >= 1, got {self.batch_size}")
        errors += self._packing_errors()
        if self.model_type not in MODEL_TYPES:
            errors.append(f"--model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        errors += image_size_errors(self.image_size)
        if self.epoch < 1:
            errors.append(f"--epoch must be >= 1, got {self.epoch}")
        if not self.lr > 0:
            errors.append(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            errors.append(f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        errors += option_errors(self.min_area, self.mask_threshold)
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
        if not self.cache_max_gb >= 0:
            errors.append(f"--cache_max_gb must be >= 0 (0: no bound), got {self.cache_max_gb:g}")
        return errors

    def _packing_errors(self) -> List[str]:
        """--objects_per_step replaces the image count of a step; semantic training has no objects."""
        if self.objects_per_step < 0:
            return [f"--objects_per_step must be >= 0 (0 = off), got {self.objects_per_step}"]
        if not self.objects_per_step:
            return []
        if self.batch_size != 1:
            return [f"--objects_per_step {self.objects_per_step} fills each step by objects: leave --batch_size at 1 "
                    f"(it counts images), got {self.batch_size}"]
        if self.task == "semantic":
            return ["--objects_per_step needs prompt training: --task semantic trains class maps, not objects"]
        return []

    def _adaptation_errors(self) -> List[str]:
        errors = []
        if self.lora_rank < 0:
            errors.append(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            errors.append(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if self.min_region_area < 0:
            errors.append(f"--min_region_area must be >= 0, got {self.min_region_area}")
        if self.accumulate < 1:
            errors.append(f"--accumulate must be >= 1, got {self.accumulate}")
        return errors

    def _anchor_errors(self, probs: Optional[Dict[str, float]]) -> List[str]:
        """--distill and --l2sp: finite weights >= 0, and the box/point task only."""
        errors = [f"--{name} must be finite and >= 0, got {value}" for name, value in
                  (("distill", self.distill), ("l2sp", self.l2sp)) if not 0 <= value < float("inf")]
        if self.distill_prompts < 1:
            errors.append(f"--distill_prompts must be >= 1, got {self.distill_prompts}")
        if not (self.distill > 0 or self.l2sp > 0):
            return errors
        if self.task == "semantic":
            errors.append("--distill and --l2sp keep the promptable decoder; --task semantic trains a new head instead")
        elif probs is not None and self._interactive(probs, self.multimask and self._single_point_prompts(probs)):
            errors.append("--distill and --l2sp train box/point prompts only, not interactive training (--prompt mixed, "
                          "--click_rounds, or single-point prompts with --multimask true: add --multimask false)")
        return errors

    def _fault_errors(self) -> List[str]:
        errors = []
        if self.save_every < 0 or self.save_every_minutes < 0:
            errors.append(f"--save_every and --save_every_minutes must be >= 0, got {self.save_every}, {self.save_every_minutes}")
        if self.max_bad_steps < 0:
            errors.append(f"--max_bad_steps must be >= 0, got {self.max_bad_steps}")
        if not self.dist_timeout > 0:
            errors.append(f"--dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        return errors

    def _attention_errors(self) -> List[str]:
        if self.attention == "standard":
            return [] if self.fft_blocks == "global" else [f"--fft_blocks {self.fft_blocks} needs --attention fft"]
        if self.attention != "fft":
            return [f"--attention must be standard or fft, got {self.attention!r}"]
        if self.model_type not in MODEL_TYPES:
            return []  # reported with the model type already
        try:
            fft_blocks_for(self.model_type, self.fft_blocks)
        except ValueError as err:
            return [str(err)]
        return []

    def _prompt_errors(self) -> List[str]:
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
        return errors

    def _tile_errors(self) -> List[str]:
        if self.tile <= 0:
            return [] if self.tile == 0 else [f"--tile must be 0 (off) or a tile side in pixels, got {self.tile}"]
        errors = []
        try:
            check_tiling(self.tile, self.tile_overlap)
        except ValueError as err:
            errors.append(str(err))
        if not 0 < self.tile_min_visible <= 1:
            errors.append(f"--tile_min_visible must be in (0, 1], got {self.tile_min_visible}")
        if self.task == "semantic":
            errors.append("--tile is not available with --task semantic yet")
        if self.augment:
            errors.append("--tile with --augment is not available yet (the left-out fragments would have to follow "
                          "every transform)")
        if self.instance_mode != "per_object":
            errors.append("--tile needs --instance_mode per_object (one object spanning the image cannot be tiled)")
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

    def __eq__(self, other: object) -> bool:
        """Equal when they record the same flags (to_dict: multimask as it acts)."""
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def to_dict(self) -> Dict[str, Any]:
        """The flags as given, multimask as it acts (the multimask outputs train only when some
        prompt is a single point): what args.json and the weights files record."""
        return dict(dataclasses.asdict(self), multimask=self.resolve().plan.multimask)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = FlagParser(
            description="Fine-tune SAM's mask decoder with box and/or point prompts, on one or many processes.",
            formatter_class=_DefaultsOnce,
        )
        groups: Dict[str, Any] = {}
        for f in fields(cls):
            section = f.metadata["section"]
            group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
            kw: Dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if "type" in f.metadata:
                kw["type"] = f.metadata["type"]
            elif f.type in (bool, "bool"):
                kw.update(type=str2bool, metavar="BOOL", nargs="?", const=True)
            elif f.type in (int, "int", Optional[int], "Optional[int]"):
                kw["type"] = int
            elif f.type in (float, "float"):
                kw["type"] = float
            group.add_argument(f"--{f.name}", **kw)
        return parser

    @classmethod
    def from_args(cls, argv: Optional[List[str]] = None) -> "TrainConfig":
        parser = cls.parser()
        args = parser.parse_args(argv)
        problem = restart_problem(args.resume)
        if problem:
            parser.fail([problem])
        if args.resume:
            # --resume RUN alone continues with the run's saved flags; flags given beside it win
            # and then go through the resume checks (resume.check_resume).
            # auto becomes the run folder, or None: a new run (resume.resolve_resume).
            try:
                resume = resolve_resume(args.resume, args.output_dir)
                if resume:
                    parser.set_defaults(**saved_args(resume, args.output_dir, {f.name for f in fields(cls)}))
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


def _parsed(parse: Callable[[Any], Any], value: Any, errors: List[str], prefix: str = "") -> Any:
    """parse(value), or None with its ValueError's message added to errors."""
    try:
        return parse(value)
    except ValueError as err:
        errors.append(prefix + str(err))
        return None
