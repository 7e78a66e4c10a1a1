"""TinyViT (vit_t image encoder) against MobileSAM's original on shared random weights."""

import warnings

import pytest
import torch

from conftest import relative_error as rel_err
from segment_anything.build_sam import VIT_T_CONFIG
from segment_anything.modeling.tiny_vit import TinyViT

with warnings.catch_warnings():
    # Importing it registers models in timm's global registry and uses deprecated timm paths.
    warnings.simplefilter("ignore")
    from mobile_sam.modeling.tiny_vit_sam import TinyViT as RefTinyViT

torch.set_num_threads(2)

VIT_T = VIT_T_CONFIG
# Small and fast, with windows that need padding at 1024 input (128, 64, 64 are not multiples
# of 6, 5, 3). The last width must stay 320: the original picks its stride-1 merge by width.
TINY = dict(
    embed_dims=[8, 16, 24, 320],
    depths=[1, 1, 2, 1],
    num_heads=[1, 2, 3, 4],
    window_sizes=[7, 6, 5, 3],
    mlp_ratio=2.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    mbconv_expand_ratio=2.0,
    local_conv_size=5,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every float parameter and buffer with non-trivial values of a sane scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("attention_biases"):
                t.copy_(noise)  # big enough to reshape the softmax
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(1 + 0.2 * noise)
            elif t.dim() == 1:
                t.copy_(0.2 * noise)
            else:
                t.copy_(noise / t[0].numel() ** 0.5)
    return model


def twins(cfg: dict, img_size: int = 1024, seed: int = 0):
    """Ours with random weights and the original holding the same weights, both in eval mode."""
    ours = randomize_(TinyViT(img_size=img_size, **cfg), seed).eval()
    ref = RefTinyViT(img_size=img_size, **cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    # The original caches its attention bias when eval() is called, so only after loading.
    return ours, ref.eval()


def ref_forward(ref: RefTinyViT, x: torch.Tensor) -> torch.Tensor:
    """The original forward with its hard-coded 64x64 token grid replaced by img_size / 16."""
    x = ref.patch_embed(x)
    for layer in ref.layers:
        x = layer(x)
    B, N, C = x.shape
    side = ref.img_size // 16
    assert N == side * side
    return ref.neck(x.transpose(1, 2).reshape(B, C, side, side))


def test_state_dict_contract():
    torch.manual_seed(0)
    ours, ref = TinyViT(**VIT_T), RefTinyViT(img_size=1024, **VIT_T)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()
    ]
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)

    ref_idxs = {k: v for k, v in ref.named_buffers() if k.endswith("attention_bias_idxs")}
    our_idxs = {k: v for k, v in ours.named_buffers() if k.endswith("attention_bias_idxs")}
    assert our_idxs.keys() == ref_idxs.keys() and len(our_idxs) == 10
    for k, v in ref_idxs.items():
        assert torch.equal(our_idxs[k], v), k

    # The original leaves the neck untagged; ours gives it the last block's scale, 1.
    ref_scales = {k: p.lr_scale for k, p in ref.named_parameters() if hasattr(p, "lr_scale")}
    our_scales = {k: p.lr_scale for k, p in ours.named_parameters()}
    assert {k: our_scales[k] for k in ref_scales} == ref_scales
    assert {our_scales[k] for k in our_scales.keys() - ref_scales.keys()} == {1.0}
    assert min(ref_scales.values()) == pytest.approx(0.8**11)


@torch.no_grad()
def test_matches_reference_tiny_config():
    ours, ref = twins(TINY, seed=1)
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    out, expected = ours(x), ref(x)
    assert out.shape == (2, 256, 64, 64)
    assert rel_err(out, expected) <= 1e-4


@torch.no_grad()
def test_matches_reference_vit_t_1024():
    ours, ref = twins(VIT_T)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    out, expected = ours(x), ref(x)
    assert out.shape == (1, 256, 64, 64)
    assert rel_err(out, expected) <= 1e-4


@pytest.mark.parametrize("img_size, batch", [(256, 2), (512, 1)])
@torch.no_grad()
def test_smaller_images_load_1024_weights_and_match_reference(img_size, batch):
    weights = randomize_(TinyViT(**VIT_T), seed=4).state_dict()
    ours = TinyViT(img_size=img_size, **VIT_T)
    ours.load_state_dict(weights, strict=True)
    ours.eval()
    # The original builds its layers from img_size and only its last reshape assumes 1024,
    # so with that one reshape generalised (ref_forward) it is an independent reference.
    ref = RefTinyViT(img_size=img_size, **VIT_T)
    ref.load_state_dict(weights, strict=True)
    ref.eval()
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(5))
    out = ours(x)
    assert out.shape == (batch, 256, img_size // 16, img_size // 16)
    assert rel_err(out, ref_forward(ref, x)) <= 1e-4


def test_train_mode_gradients_match_reference():
    ours, ref = twins(TINY, seed=6)
    ours.train(), ref.train()
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(7))
    grad_out = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(8))
    ours(x).backward(grad_out)
    ref(x).backward(grad_out)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    # Biases feeding straight into a train-mode BatchNorm have an exact gradient of zero, so
    # only rounding noise is left to compare; bound errors by the largest gradient too.
    scale = max(g.abs().max() for g in ref_grads.values() if g is not None)
    for name, p in ours.named_parameters():
        if p.grad is None:
            assert ref_grads[name] is None, name
        else:
            err = (p.grad - ref_grads[name]).abs().max()
            assert err <= max(1e-4 * ref_grads[name].abs().max(), 1e-5 * scale), name
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], msg=name)


def small_model(**overrides) -> TinyViT:
    cfg = dict(TINY, embed_dims=[8, 16, 24, 32], drop_rate=0.1, drop_path_rate=0.2)
    cfg.update(overrides)
    return randomize_(TinyViT(img_size=128, **cfg), seed=9).train()


def test_checkpointing_keeps_gradients_and_bn_statistics():
    plain, ckpt = small_model(), small_model(use_checkpoint=True)
    calls = []
    ckpt.layers[2].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(10))
    for model in (plain, ckpt):
        torch.manual_seed(11)  # same dropout and drop-path masks in both runs
        model(x).square().mean().backward()
    assert len(calls) == 2  # the block really was recomputed

    ckpt_grads = {k: p.grad for k, p in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        if p.grad is None:
            assert ckpt_grads[name] is None, name
        else:
            torch.testing.assert_close(ckpt_grads[name], p.grad, msg=name)
    ckpt_buffers = dict(ckpt.named_buffers())
    for name, b in plain.named_buffers():
        torch.testing.assert_close(ckpt_buffers[name], b, msg=name)


def test_every_parameter_but_the_classifier_gets_a_gradient():
    model = small_model(drop_rate=0.0, drop_path_rate=0.0)  # a dropped branch gets no gradient
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(12))
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        unused = name.startswith(("head.", "norm_head."))
        if unused:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("drop_prob", [0.0, 0.3, 1.0])
def test_drop_path_draws_like_timm(drop_prob):
    """Our stochastic depth module against timm's (MobileSAM's TinyViT uses it): the same output
    from the same seed in training, the identity in eval."""
    from timm.layers import DropPath as TimmDropPath

    from segment_anything.modeling.common import DropPath

    x = torch.randn(6, 4, 5, 5)
    ours, ref = DropPath(drop_prob), TimmDropPath(drop_prob)
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = ref(x)
    assert torch.equal(a, b)
    if 0.0 < drop_prob < 1.0:
        kept = (a.flatten(1) != 0).all(1)
        assert 0 < kept.sum() < 6  # some samples dropped, some kept (seeded)
        assert torch.allclose(a[kept], x[kept] / (1 - drop_prob))
    assert torch.equal(ours.eval()(x), x)
