"""run.py with --attention fft: vit_b's encoder trains under 2 DDP processes with FFT
mixing in its global blocks, and the choice survives into best.pth, resume and the tools.

vit_b at 128 px on the synthetic fixtures of tests/test_run.py, one epoch of 2 steps per rank.
"""

import argparse
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from segment_anything import sam_model_registry
from segment_anything.modeling.fft_attention import fft_block_indices
from segment_anything.tools._model import load_model
from segment_anything.training.resume import ResumeError, check_resume
from segment_anything.training.config import TrainConfig
from test_run import ENV, SIZE, base_flags, data, free_port, run_ok  # noqa: F401


@pytest.fixture(scope="module")
def fft_run(data, tmp_path_factory):
    """Two ranks x batch 1 on 4 images: 2 steps each, so DDP would fail on the second step if a
    trainable parameter (the FFT blocks' unused relative-position tables) got no gradient."""
    out = tmp_path_factory.mktemp("runs") / "fft"
    run_ok(base_flags(*data, out, model_type="vit_b", batch_size=1, epoch=1, world_size=2, port=free_port())
           + ["--train", "image_encoder", "--attention", "fft", "--lr", "1e-3"])
    return out


def test_encoder_training_with_fft_mixing_under_two_processes(fft_run):
    log = (fft_run / "train.log").read_text()
    assert "FFT token mixing in blocks 2, 5, 8, 11" in log and "2 process(es) on cpu" in log
    best = torch.load(fft_run / "best.pth", map_location="cpu", weights_only=True)
    assert best["attention"] == {"type": "fft", "blocks": [2, 5, 8, 11]}
    weights = best["model"]
    torch.manual_seed(21)
    init = sam_model_registry["vit_b"](checkpoint=None, image_size=SIZE).state_dict()
    assert weights and all(k.startswith("image_encoder.") and init[k].shape == v.shape for k, v in weights.items())
    assert not torch.equal(weights["image_encoder.blocks.5.attn.qkv.weight"], init["image_encoder.blocks.5.attn.qkv.weight"])
    # Kept for the stock keys, frozen, so not in best.pth; the windowed blocks' tables trained.
    assert "image_encoder.blocks.5.attn.rel_pos_h" not in weights and "image_encoder.blocks.4.attn.rel_pos_h" in weights


def test_the_tools_and_resume_rebuild_the_fft_encoder(fft_run):
    args = argparse.Namespace(model_type="vit_b", checkpoint="none", image_size=None, seed=21, device="cpu")
    sam = load_model(args, str(fft_run / "best.pth"))
    assert fft_block_indices(sam) == [2, 5, 8, 11] and sam.image_encoder.img_size == SIZE
    args.attention = "standard"  # an explicit flag wins over the file, with a warning
    with pytest.warns(UserWarning, match=r"trained with FFT token mixing in image encoder blocks \[2, 5, 8, 11\]"):
        assert fft_block_indices(load_model(args, str(fft_run / "best.pth"))) == []

    cfg = TrainConfig.from_args(["--resume", str(fft_run)])
    assert (cfg.attention, cfg.fft_blocks) == ("fft", "global")
    with pytest.raises(ResumeError, match="--attention fft"):
        check_resume(TrainConfig.from_args(["--resume", str(fft_run), "--attention", "standard"]))


def test_load_model_ex_builds_the_fft_encoder_from_best_pth(fft_run, data, tmp_path):
    checkpoint = tmp_path / "vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](image_size=SIZE).state_dict(), checkpoint)
    image = sorted((data[1] / "images").glob("*.png"))[0]
    proc = subprocess.run([sys.executable, "load_model_ex.py", "--checkpoint", str(checkpoint), "--weights",
                           str(fft_run / "best.pth"), "--image", str(image), "--output", str(tmp_path / "m.png")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"vit_b at {SIZE} px with FFT token mixing" in proc.stdout
