"""inspect_weights / check_checkpoint: what a weights file is, and the --checkpoint preflight."""

from pathlib import Path

import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.training.config import TrainConfig
from segment_anything.training.preflight import preflight
from segment_anything.utils.save_weight import save_partial_weight
from segment_anything.utils.weights import check_checkpoint, guess_model_type, inspect_weights

SIZE = 64


@pytest.fixture(scope="module")
def vit_t(tmp_path_factory):
    """A vit_t at 64 px, its full state dict, a best.pth and a last.pth-like resume file."""
    root = tmp_path_factory.mktemp("weights")
    sam = sam_model_registry["vit_t"](image_size=SIZE)
    torch.save(sam.state_dict(), root / "vit_t.pth")
    for name, p in sam.named_parameters():
        p.requires_grad_(name.startswith("mask_decoder."))
    save_partial_weight(sam, root / "best.pth", metadata={"model_type": "vit_t", "image_size": SIZE})
    decoder = {k: v for k, v in sam.state_dict().items() if k.startswith("mask_decoder.")}
    # As engine.Training.state_dict writes it: numpy RNG state makes it unloadable with weights_only=True.
    import numpy as np
    torch.save({"format": "sam-resume-v1", "model": decoder, "optimizer": {}, "scheduler": {}, "epoch": 1,
                "rng": [{"numpy": np.random.get_state()}], "args": {"model_type": "vit_t", "image_size": SIZE}},
               root / "last.pth")
    return root, sam


def fake_vit(width: int, depth: int, grid: int = 64) -> dict:
    """The keys and shapes that tell ViT types apart (a real vit_h file is 2.5 GB)."""
    sd = {"image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16),
          "image_encoder.pos_embed": torch.zeros(1, grid, grid, width),
          "prompt_encoder.no_mask_embed.weight": torch.zeros(1, 256),
          "mask_decoder.iou_token.weight": torch.zeros(1, 256)}
    sd.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(width) for i in range(depth)})
    return sd


@pytest.mark.parametrize("width, depth, name", [(768, 12, "vit_b"), (1024, 24, "vit_l"), (1280, 32, "vit_h")])
def test_vit_types_are_told_apart_by_width_and_depth(width, depth, name, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(fake_vit(width, depth, grid=16), path)
    info = inspect_weights(path)
    assert (info.kind, info.model_type, info.image_size) == ("full", name, 256)
    assert guess_model_type(fake_vit(width, depth - 1)).startswith("unknown ViT")


def test_each_kind_of_file_is_named(vit_t, tmp_path):
    root, _ = vit_t
    full = inspect_weights(root / "vit_t.pth")
    assert (full.kind, full.model_type, full.image_size) == ("full", "vit_t", None)  # TinyViT has no size-bound tensor
    best = inspect_weights(root / "best.pth")
    assert (best.kind, best.model_type, best.image_size, best.parts) == ("partial", "vit_t", SIZE, {"mask_decoder"})
    last = inspect_weights(root / "last.pth")
    assert (last.kind, last.model_type, last.image_size, last.metadata["epoch"]) == ("resume", "vit_t", SIZE, 1)

    data = (root / "vit_t.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert inspect_weights(tmp_path / "cut.pth").kind == "truncated"
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    text = inspect_weights(tmp_path / "notes.pth")
    assert text.kind == "not_checkpoint" and "b'thes'" in text.describe()
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "holds a list" in inspect_weights(tmp_path / "list.pth").describe()


def test_checkpoint_preflight_says_what_was_found_and_what_was_expected(vit_t, tmp_path):
    root, _ = vit_t
    assert check_checkpoint(root / "vit_t.pth", "vit_t", SIZE).kind == "full"
    cases = {
        "best.pth": ["partial fine-tuned weights (mask_decoder only", "expected the full vit_t state dict", "--weights"],
        "last.pth": ["a resume file (last.pth)", f"--resume {root / 'last.pth'}"],
    }
    for name, needles in cases.items():
        with pytest.raises(ValueError) as err:
            check_checkpoint(root / name, "vit_t", SIZE)
        assert all(n in str(err.value) for n in needles), str(err.value)
    with pytest.raises(ValueError, match="holds vit_t weights .* but --model_type is vit_b; pass --model_type vit_t"):
        check_checkpoint(root / "vit_t.pth", "vit_b", SIZE)

    torch.save(fake_vit(768, 12), tmp_path / "vit_b.pth")
    with pytest.raises(ValueError, match="holds vit_b weights .* but --model_type is vit_t"):
        check_checkpoint(tmp_path / "vit_b.pth", "vit_t", SIZE)
    with pytest.raises(ValueError, match=r"does not fit vit_b at 64 px: \d+ missing"):
        check_checkpoint(tmp_path / "vit_b.pth", "vit_b", SIZE)  # right type, but most keys are absent
    torch.save(fake_vit(768, 12, grid=16), tmp_path / "vit_b_256.pth")
    with pytest.raises(ValueError, match="for 256-px inputs .* --image_size is 512; .* pass --image_size 256"):
        check_checkpoint(tmp_path / "vit_b_256.pth", "vit_b", 512)


def test_preflight_checks_the_weights_before_the_data_and_says_train_dir_first(vit_t, tmp_path):
    root, _ = vit_t
    with pytest.raises(Exception, match="--train_dir is required"):
        preflight(TrainConfig())  # what `python run.py` with no flags says
    (tmp_path / "notes.pth").write_text("not weights")
    cfg = TrainConfig(train_dir=str(tmp_path / "no_such_data"), checkpoint=str(tmp_path / "notes.pth"))
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        preflight(cfg)
    with pytest.raises(FileNotFoundError, match="mobile_sam.pt not found. The official vit_t weights"):
        preflight(TrainConfig(train_dir=str(tmp_path), checkpoint=str(tmp_path / "mobile_sam.pt")))
