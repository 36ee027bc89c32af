"""The training-free dense baseline (MaskCLIP read-out) on random-init open_clip teachers: each
read-out checked against an independent computation from the tower's own weights, and
`zeroseg eval --method dense` on the tiny demo's scenes."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, VisionTransformer
from typer.testing import CliRunner

from zeroseg.cli import app
from zeroseg.pipeline.teacher import load_teacher
from zeroseg.segment.dense import DensePredictor, dense_features
from zeroseg.segment.zeroshot import Vocabulary, student_input


@pytest.fixture(scope="module")
def resnet_teacher():
    """zeroseg-toy: open_clip's ModifiedResNet at its smallest (32 px input, stride 32)."""
    return load_teacher("zeroseg-toy", "random", seed=0)


def _pixels(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _last_block_input(teacher, pixels: torch.Tensor) -> torch.Tensor:
    """The tokens entering the last transformer block during the teacher's own forward pass."""
    seen = []
    block = teacher.model.visual.transformer.resblocks[-1]
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        teacher.encode_images(pixels)
    finally:
        handle.remove()
    return seen[0]


def _value_path(visual, block, tokens: torch.Tensor) -> torch.Tensor:
    """By hand from the weights: each token's own value, through the out projection (what the
    attention gives when a token attends only to itself), with the block's layer scale."""
    d = tokens.shape[-1]
    y = block.ln_1(tokens)
    attn = block.attn
    v = y @ attn.in_proj_weight[2 * d:].T + attn.in_proj_bias[2 * d:]
    if isinstance(block, CustomResidualAttentionBlock):
        n, length, _ = v.shape
        heads = v.view(n, length, attn.num_heads, -1).transpose(1, 2) * attn.head_scale  # (N, H, L, d/H)
        v = attn.ln_inner(heads.transpose(1, 2).reshape(n, length, d))
        return block.ls_1(block.ln_attn(attn.out_proj(v)))
    return block.ls_1(attn.out_proj(v))


def _maskclip_by_hand(visual, tokens: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last block (its code: value path + residual, then the MLP with its residual),
    ln_post and proj on the patch tokens: (B, L, width) -> (B, D, h, w)."""
    block = visual.transformer.resblocks[-1]
    x = tokens + _value_path(visual, block, tokens)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    out = visual.ln_post(x[:, 1:]) @ visual.proj
    side = int(out.shape[1] ** 0.5)
    return out.transpose(1, 2).reshape(len(out), -1, side, side)


def test_vit_maskclip_features_are_the_value_path_of_the_last_block(tiny_teacher):
    visual = tiny_teacher.model.visual
    pixels = _pixels(2, tiny_teacher.info.input_size)  # 64 px, patch 8: an 8x8 grid
    features = dense_features(tiny_teacher, pixels)
    assert features.shape == (2, tiny_teacher.info.embed_dim, 8, 8) and features.dtype == torch.float32

    with torch.no_grad():
        tokens = _last_block_input(tiny_teacher, pixels)
        expected = _maskclip_by_hand(visual, tokens)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
        # the attention really was skipped: the block's own forward (query-key attention) differs
        block = visual.transformer.resblocks[-1]
        attended = visual.ln_post(block(tokens)[:, 1:]) @ visual.proj
        assert (attended.transpose(1, 2).reshape(expected.shape) - expected).abs().max() > 1e-2

        # clearclip: the attention branch alone (no residual, no MLP)
        clear = dense_features(tiny_teacher, pixels, variant="clearclip")
        by_hand = visual.ln_post(_value_path(visual, block, tokens)[:, 1:]) @ visual.proj
        torch.testing.assert_close(clear, by_hand.transpose(1, 2).reshape(expected.shape), atol=1e-5, rtol=1e-4)


def test_vit_with_open_clips_own_attention_block(tiny_teacher):
    """A tower of CustomResidualAttentionBlocks (open_clip's Attention, head scale, attention
    norm, layer scale): the read-out keeps each of them."""
    torch.manual_seed(1)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, ls_init_value=0.5,
        output_dim=32, scale_heads=True, scale_attn=True,
    ).eval()
    block = visual.transformer.resblocks[-1]
    assert isinstance(block, CustomResidualAttentionBlock)
    with torch.no_grad():
        block.attn.head_scale.uniform_(0.5, 2.0)  # not the identity it starts as
    teacher = dataclasses.replace(tiny_teacher, model=torch.nn.ModuleDict({"visual": visual}))
    teacher.model.visual = visual
    pixels = _pixels(2, 32, seed=1)
    with torch.no_grad():
        tokens = []
        handle = block.register_forward_pre_hook(lambda module, args: tokens.append(args[0].clone()))
        visual(teacher.normalise(pixels))
        handle.remove()
        features = dense_features(teacher, pixels)
        torch.testing.assert_close(features, _maskclip_by_hand(visual, tokens[0]), atol=1e-5, rtol=1e-4)


def test_vit_at_a_larger_input_resizes_the_positional_embedding(tiny_teacher):
    """4x the input side (what DensePredictor feeds by default): a 32x32 patch grid, the 8x8
    positional embedding resized to it."""
    pixels = _pixels(1, 4 * tiny_teacher.info.input_size)
    features = dense_features(tiny_teacher, pixels)
    assert features.shape == (1, tiny_teacher.info.embed_dim, 32, 32)
    assert torch.isfinite(features).all()


def test_resnet_features_shape_and_their_mean_is_the_attention_pool_without_attention(resnet_teacher):
    """Per position: c_proj(v_proj(x_p)). The attention pool attends over [mean_p x_p, x_1..x_n] +
    positions; with the query and key projections zero every logit is 0 (uniform attention), and
    with zero positions each head's output is v_proj of the mean of those n+1 tokens = v_proj(mean
    x_p); v_proj and c_proj are affine, so the pool's output is the mean of the dense features."""
    pixels = _pixels(2, 4 * resnet_teacher.info.input_size)  # 128 px, stride 32: 4x4 positions
    pixels[:, :, :, :48] = 0.0  # dark left, bright top: positions that differ
    pixels[:, :, :40] = 1.0
    features = dense_features(resnet_teacher, pixels)
    assert features.shape == (2, resnet_teacher.info.embed_dim, 4, 4)

    visual = copy.deepcopy(resnet_teacher.model.visual)
    pool = visual.attnpool
    with torch.no_grad():
        pool.positional_embedding = torch.nn.Parameter(torch.zeros(4 * 4 + 1, pool.v_proj.in_features))
        for proj in (pool.q_proj, pool.k_proj):  # a random init's features are tiny (~1e-3), so are
            proj.weight.mul_(1e3)  # its logits: sharpened, the control's attention is far from uniform
        attended = visual(resnet_teacher.normalise(pixels))  # q/k not zero: attention not uniform
        for proj in (pool.q_proj, pool.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        uniform = visual(resnet_teacher.normalise(pixels))
    mean = features.mean(dim=(2, 3))
    torch.testing.assert_close(uniform, mean, atol=1e-5, rtol=1e-4)
    assert (attended - mean).abs().max() > 1e-3  # the property needs the uniform attention
    # the read-out never used what was zeroed: the modified tower reads the same
    twin = dataclasses.replace(resnet_teacher, model=torch.nn.ModuleDict({"visual": visual}))
    torch.testing.assert_close(dense_features(twin, pixels), features)


def test_dense_predictor_labels_each_position_and_upsamples_to_the_image(resnet_teacher):
    """Vocabulary entries = the features of two positions: those positions take their labels with
    similarity 1, and the map comes back at the image's own (non-square) size."""
    image = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    view = torch.from_numpy(student_input(image, 128).copy()).permute(2, 0, 1)[None].float().div(255)  # as the predictor
    features = dense_features(resnet_teacher, view)[0]  # (D, 4, 4)
    vocab = Vocabulary.build(["first", "last"], torch.stack([features[:, 0, 0], features[:, 3, 3]]).numpy())
    predictor = DensePredictor(resnet_teacher, vocab)
    raw = predictor.raw([image])[0]
    assert raw.labels.shape == (48, 80) and raw.scores.shape == (48, 80) and raw.labels.dtype == np.uint8
    assert raw.labels[0, 0] == 1 and raw.labels[-1, -1] == 2  # corners: their own position's entry
    assert raw.scores[0, 0] == pytest.approx(1.0, abs=1e-4) and raw.scores[-1, -1] == pytest.approx(1.0, abs=1e-4)
    sims = F.normalize(features, dim=0).flatten(1).T @ vocab.embeddings.T  # (16, 2)
    assert raw.scores.max() <= sims.max().item() + 1e-5  # bilinear: never above the map's maximum
    assert set(np.unique(raw.mask(2.0)).tolist()) == {0}  # the threshold makes everything background


def test_eval_method_dense_on_the_tiny_demo(tiny_demo, tmp_path):
    out, summary = tiny_demo
    result = CliRunner().invoke(app, [
        "eval", str(out / "scenes" / "heldout"), "--method", "dense", "--store", summary["store"],
        "--vocab", "scenes", "--calibrate-on", str(out / "scenes" / "train"), "--limit", "8", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval_dense.json").read_text())
    assert report["method"] == "dense" and report["n_images"] == 6
    assert report["miou"] is not None and 0.0 <= report["miou"] <= 1.0
    assert "not stored: the dense method has no run" in report["bg_threshold_source"]
    assert (tmp_path / "confusion_dense.png").is_file()
    # the demo evaluates it the same way (first 8 train scenes, same held-out ones)
    assert report["miou"] == summary["results"]["dense"]["miou"]
