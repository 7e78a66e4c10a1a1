"""The warm training step's core: mask-decoder forward + backward, ours vs the official decoder.

    python bench/decoder_step.py                     # 6 box prompts on one 64x64 embedding
    python bench/decoder_step.py --prompts 16 --images 2

Same random weights, same embeddings, boxes and loss (BCE on the 256x256 logits + the IoU
head's squared error), one process, interleaved rounds. The official decoder (mobile_sam,
Meta's modeling code) runs once per image, as the reference loop of bench/train.py does; ours
takes every prompt of every image in one call (image_index), as our trainer does. Rows in
float32 and in bf16 autocast. Prints a Markdown table with the command and machine line, and
each row's masks' max relative difference from the official float32 masks.

Each step is also given as a multiple of this machine's floor, as bench/encoder.py does for
the encoder: the step's floating-point operations (forward + backward, counted with
torch.utils.flop_counter) over the rate of a large matrix product measured in the same rounds
(float32 for the float32 rows, bf16 for the autocast rows). Two counts: the official step's
work (the convention of bench/encoder.py) and each decoder's own (ours does fewer operations:
the folded cross-attention projections), so the second ratio says how close a step runs to the
machine's rate for the work it actually does.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.utils.random_weights import randomize_  # noqa: E402
from bench._machine import gemm_rate, machine_line  # noqa: E402


def models():
    warnings.filterwarnings("ignore")  # mobile_sam re-registers timm models on import
    import mobile_sam

    ours = randomize_(sam_model_registry["vit_t"](), seed=0)  # every SAM's decoder is the same size
    official = mobile_sam.sam_model_registry["vit_t"]()
    official.load_state_dict(ours.state_dict())
    for sam in (ours, official):
        sam.image_encoder = None  # not used: the step starts from embeddings
        sam.prompt_encoder.requires_grad_(False)
    return ours, official


def inputs(args):
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(args.images, 256, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    image_index = torch.arange(args.prompts) * args.images // args.prompts
    corner = torch.rand(args.prompts, 2, generator=gen) * 700
    boxes = torch.cat([corner, corner + 50 + torch.rand(args.prompts, 2, generator=gen) * 250], dim=1)
    target = (torch.rand(args.prompts, 256, 256, generator=gen) > 0.5).float()
    return embeddings, image_index, boxes, target


def step(sam, ours: bool, amp: bool, data) -> torch.Tensor:
    """One forward + backward; returns the masks (float32, detached)."""
    embeddings, image_index, boxes, target = data
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        if ours:
            masks, iou = sam.mask_decoder(embeddings, pe, sparse, dense, False, image_index=image_index)
        else:
            parts = [sam.mask_decoder(embeddings[i : i + 1], pe, sparse[image_index == i], dense[image_index == i], False)
                     for i in range(embeddings.shape[0])]
            masks, iou = (torch.cat(p) for p in zip(*parts))
    loss = F.binary_cross_entropy_with_logits(masks[:, 0].float(), target) + (iou.float() ** 2).mean()
    loss.backward()
    sam.zero_grad(set_to_none=True)
    return masks.detach().float()


def count_flops(sam, is_ours: bool, data) -> int:
    """Floating-point operations (2 per multiply-add) of one float32 step, forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(sam, is_ours, False, data)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6, help="box prompts per step")
    parser.add_argument("--images", type=int, default=1, help="images the prompts are spread over")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds; the best counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, official = models()
    data = inputs(args)
    rows = {("official", False): (official, False), ("ours", False): (ours, True),
            ("official", True): (official, False), ("ours", True): (ours, True)}
    masks = {key: step(sam, is_ours, key[1], data) for key, (sam, is_ours) in rows.items()}  # warm-up
    best = {key: float("inf") for key in rows}
    flops = {name: count_flops(sam, is_ours, data) for (name, amp), (sam, is_ours) in rows.items() if not amp}
    rates = {False: 0.0, True: 0.0}
    for _ in range(args.repeats):
        for amp in rates:  # the floor's rate in the same rounds, so it sees the same neighbours
            rates[amp] = max(rates[amp], gemm_rate(torch.bfloat16 if amp else torch.float32, repeats=1))
        for key, (sam, is_ours) in rows.items():
            start = time.perf_counter()
            step(sam, is_ours, key[1], data)
            best[key] = min(best[key], time.perf_counter() - start)

    ref, ref_time = masks[("official", False)], best[("official", False)]
    print(f"command: python bench/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(machine_line(args.threads))
    print(f"step: mask decoder forward + backward, {args.prompts} box prompts on {args.images} image(s), "
          f"best of {args.repeats} interleaved rounds")
    print(f"work: {flops['official'] / 1e9:.2f} GFLOP per step (official), {flops['ours'] / 1e9:.2f} GFLOP (ours)")
    for amp, name in ((False, "float32"), (True, "bf16")):
        print(f"floor {name}: 4096^3 matmul at {rates[amp] / 1e9:,.0f} GFLOP/s (best of the rounds) -> "
              f"{flops['official'] / rates[amp] * 1000:,.1f} ms (official work), {flops['ours'] / rates[amp] * 1000:,.1f} ms (ours)")
    print("\n| decoder | precision | ms / step | vs official float32 | x floor (official work) | x floor (own work) "
          "| max rel. difference of the masks |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, amp), seconds in best.items():
        diff = ((masks[(name, amp)] - ref).abs().max() / ref.abs().max()).item()
        print(f"| {name} | {'bf16 autocast' if amp else 'float32'} | {seconds * 1000:,.0f} | "
              f"{ref_time / seconds:.2f}x | {seconds * rates[amp] / flops['official']:.1f}x "
              f"| {seconds * rates[amp] / flops[name]:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
