"""The semantic head: shapes at several encoder sizes, key names apart from stock SAM's, and
how stock SAM and load_partial_weight treat a file that holds it."""

import pytest
import torch

from segment_anything import sam_model_registry
from segment_anything.modeling.semantic_head import KEY_PREFIX, SemanticHead, attach_head, upsample_logits
from segment_anything.utils.save_weight import load_partial_weight, save_partial_weight
from segment_anything.utils.trainable import trained_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [64, 128])
def test_head_output_covers_the_encoder_input(size):
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=size).eval()
    head = attach_head(sam, 5).eval()
    with torch.no_grad():
        emb = sam.image_encoder(torch.randn(2, 3, size, size))
        logits = sam.semantic_head(emb)
    assert emb.shape == (2, 256, size // 16, size // 16)
    assert logits.shape == (2, 5, size, size) and head.num_classes == 5
    full = upsample_logits(logits, (size, size * 3 // 4), (300, 225))
    assert full.shape == (2, 5, 300, 225)


def test_head_gradients_reach_every_parameter():
    head = SemanticHead(3, in_channels=32, upscale=4)
    head(torch.randn(2, 32, 4, 4)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    with pytest.raises(ValueError, match=">= 2 classes"):
        SemanticHead(1)


def test_head_keys_do_not_collide_and_stock_sam_ignores_them(tmp_path):
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"](checkpoint=None, image_size=64)
    stock_keys = set(sam.state_dict())
    sam.requires_grad_(False)
    attach_head(sam, 3)
    head_keys = set(sam.state_dict()) - stock_keys
    assert head_keys and all(k.startswith(KEY_PREFIX) for k in head_keys)
    # BatchNorm statistics of the trained head travel with best.pth.
    saved = trained_state_dict(sam)
    assert set(saved) == head_keys and any(k.endswith("running_mean") for k in saved)
    save_partial_weight(sam, tmp_path / "best.pth", metadata={"model_type": "vit_t", "task": "semantic"},
                        weights=saved)
    plain = sam_model_registry["vit_t"](checkpoint=None, image_size=64)
    result = plain.load_state_dict(torch.load(tmp_path / "best.pth", weights_only=True)["model"], strict=False)
    assert set(result.unexpected_keys) == set(saved) and not set(result.missing_keys) & head_keys
    with pytest.raises(ValueError, match="unknown keys"):
        load_partial_weight(plain, tmp_path / "best.pth")
    with pytest.raises(ValueError, match="unknown keys"):
        load_partial_weight(plain, tmp_path / "best.pth", strict=False)  # nothing of it fits: still an error
    torch.manual_seed(1)
    other = sam_model_registry["vit_t"](checkpoint=None, image_size=64)
    attach_head(other, 3)
    load_partial_weight(other, tmp_path / "best.pth")
    for key, value in saved.items():
        assert torch.equal(other.state_dict()[key], value)
