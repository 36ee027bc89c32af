"""The student model and the losses on hand-made tensors (no store)."""

import dataclasses
import json
import math

import numpy as np

import pytest
import torch

from zeroseg.errors import UserError
from zeroseg.geometry import box_membership
from zeroseg.trainer.losses import (
    LossConfig, assign_loss, coverage_loss, fit_whitening, matching_loss, mae_loss, prepare_targets, region_loss,
    zeroseg_losses,
)
from zeroseg.trainer.model import PRESETS, GroupingBlock, StudentOutput, ZeroSegStudent, hard_gumbel_softmax, preset


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "base" else n for n in PRESETS])
def test_preset_shapes(name):
    torch.manual_seed(0)
    model = ZeroSegStudent(preset(name, out_dim=48))
    c = model.config
    k = c.group_tokens[-1]
    pixels = torch.randint(0, 256, (2, c.image_size, c.image_size, 3), dtype=torch.uint8)
    out = model(pixels, mask_ratio=0.6)
    assert out.segments.shape == (2, k, 48)
    assert out.z.shape == (2, 48)
    assert out.recon.shape == out.target.shape == (2, c.n_patches, c.patch_size**2 * 3)
    assert out.mask.shape == (2, c.n_patches)
    v = c.n_patches - round(c.n_patches * 0.6)
    assert out.keep.shape == (2, v) and out.patches.shape == (2, v, 48)
    assert out.soft_assignment.shape == (2, v, k)
    assert torch.allclose(out.soft_assignment.sum(-1), torch.ones(2, v))  # a distribution over segments
    seg = model.segment(pixels)
    assert seg.tokens.shape == (2, k, 48) and seg.tokens.dtype == torch.float32
    assert seg.assignment.shape == (2, c.grid, c.grid) and seg.assignment.dtype == torch.long
    assert 0 <= seg.assignment.min() and seg.assignment.max() < k
    assert model.training  # segment() leaves the mode as it found it


def test_segment_resizes_a_larger_view():
    model = ZeroSegStudent(preset("tiny", out_dim=8))
    seg = model.segment(torch.randint(0, 256, (1, 48, 48, 3), dtype=torch.uint8))
    assert seg.assignment.shape == (1, 4, 4)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.6, 0.75, 0.9])
def test_masking_keeps_exactly_the_ratio(ratio):
    n = 196
    keep, mask = ZeroSegStudent.random_masking(5, n, ratio, "cpu")
    hidden = round(n * ratio)
    assert (mask.sum(dim=1) == hidden).all()
    assert keep.shape == (5, n - hidden)
    assert (torch.gather(mask, 1, keep) == 0).all()  # the kept ones are the visible ones
    assert all(len(set(row.tolist())) == n - hidden for row in keep)


def test_masking_ratio_in_the_forward_pass():
    model = ZeroSegStudent(preset("tiny", out_dim=8))  # 16 patches
    out = model(torch.zeros(3, 32, 32, 3, dtype=torch.uint8), mask_ratio=0.6)
    assert (out.mask.sum(dim=1) == round(16 * 0.6)).all()
    assert model(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), mask_ratio=0.0).recon is None


def test_grouping_is_hard_one_hot_and_straight_through():
    torch.manual_seed(0)
    block = GroupingBlock(width=16, heads=2, mlp_ratio=2.0)
    tokens = torch.randn(2, 10, 16, requires_grad=True)
    groups = torch.randn(2, 4, 16)
    for training in (False, True):
        block.train(training)
        out, assign, soft = block(tokens, groups)
        assert out.shape == (2, 4, 16) and assign.shape == soft.shape == (2, 10, 4)
        assert set(assign.unique().tolist()) <= {0.0, 1.0}
        assert (assign.sum(dim=-1) == 1).all()  # every token in exactly one group
        assert torch.allclose(soft.sum(dim=-1), torch.ones(2, 10))
    block.eval()
    a1 = block(tokens, groups)[1]
    assert torch.equal(a1, block(tokens, groups)[1])  # argmax at inference: no noise
    block.train()
    out, _, _ = block(tokens, groups)
    out.sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_hard_gumbel_softmax_noise_scale():
    logits = torch.tensor([[2.0, 0.5], [0.1, 1.0], [-1.0, -3.0]], requires_grad=True)  # (G=3, n=2)
    hard = hard_gumbel_softmax(logits, noise=0.0, dim=0)
    assert torch.equal(hard.detach(), torch.tensor([[1.0, 0], [0, 1], [0, 0]]))  # plain argmax
    (hard * torch.arange(6.0).view(3, 2)).sum().backward()
    soft = logits.detach().clone().requires_grad_()
    (soft.softmax(0) * torch.arange(6.0).view(3, 2)).sum().backward()
    torch.testing.assert_close(logits.grad, soft.grad)  # the soft assignment's gradient
    torch.manual_seed(0)
    a = hard_gumbel_softmax(logits.detach(), noise=1.0, dim=0)
    torch.manual_seed(0)
    b = torch.nn.functional.gumbel_softmax(logits.detach(), tau=1.0, hard=True, dim=0)
    assert torch.equal(a, b)  # noise 1 is torch's (GroupViT's) gumbel_softmax


def test_grouping_without_residual_builds_tokens_from_their_members_only():
    torch.manual_seed(0)
    tokens, groups = torch.randn(1, 2, 16), torch.randn(1, 4, 16)  # 2 tokens, 4 groups: >= 2 empty
    for residual in (True, False):
        torch.manual_seed(0)
        block = GroupingBlock(width=16, heads=2, mlp_ratio=2.0, residual=residual).eval()
        out, assign, _ = block(tokens, groups)
        empty = out[0, assign.sum(dim=1)[0] == 0]  # (>=2, W) the tokens of the empty groups
        # with GroupViT's residual an empty group still carries its group token; without, nothing
        assert torch.allclose(empty[0], empty[1:]) != residual


def test_centred_logits_ignore_a_per_group_offset():
    torch.manual_seed(0)
    block = GroupingBlock(width=16, heads=2, mlp_ratio=2.0, center=True).eval()
    tokens, groups = torch.randn(2, 12, 16), torch.randn(2, 4, 16)
    assign = block(tokens, groups)[1]
    with torch.no_grad():
        block.k.bias += torch.randn(16) * 5  # adds q_g . b to every logit of group g
    assert torch.equal(block(tokens, groups)[1], assign)


def test_segment_assignment_is_the_composed_grouping():
    torch.manual_seed(1)
    model = ZeroSegStudent(preset("tiny", out_dim=8)).eval()
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    seen = []  # each grouping block's hard assignment, in order
    for block in model.grouping:
        block.register_forward_hook(lambda module, args, out: seen.append(out[1]))
    assignment = model.segment(pixels).assignment
    a1, a2 = seen  # (B, N, G1), (B, G1, G2)
    expected = a2.argmax(-1).gather(1, a1.argmax(-1)).view(2, 4, 4)  # patch -> group 1 -> group 2
    assert torch.equal(assignment, expected)


def test_matching_picks_the_min_per_token():
    d = 4
    g = torch.tensor([[[0.0, 0, 0, 0], [1, 1, 1, 1]]])  # (1, K=2, D)
    v = torch.tensor([[[5.0, 5, 5, 5], [0.9, 1, 1, 1.1], [0.5, 0, 0, 0]]])  # (1, C'=3, D)
    # token 0: nearest is v2 (L1 0.5), token 1: nearest is v1 (L1 0.2); mean over dims, then tokens
    expected = (0.5 / d + 0.2 / d) / 2
    assert matching_loss(g, v).item() == pytest.approx(expected)


def test_matching_excludes_the_1x1_crop_and_distill_includes_it():
    d = 6
    global_feat = torch.full((1, 1, d), 3.0)  # crop 0, the 1x1 view
    local_feats = torch.full((1, 4, d), -2.0)
    features = torch.cat([global_feat, local_feats], dim=1)  # (1, 5, D)
    local = torch.tensor([False, True, True, True, True])
    out = StudentOutput(
        segments=torch.full((1, 2, d), 3.0),  # exactly the 1x1 feature: would be 0 if it counted
        z=torch.full((1, d), -2.0),  # exactly the local ones: distill is then only the 1x1's error
        recon=None, target=None, mask=torch.zeros(1, 4),
        keep=torch.zeros(1, 0, dtype=torch.long), patches=torch.zeros(1, 0, d), soft_assignment=torch.zeros(1, 0, 2),
    )
    _, terms = zeroseg_losses(out, features, local, LossConfig(mae=0, target_norm="none"))
    assert terms["match"] == pytest.approx(5.0)  # |3 - (-2)| to the nearest local crop
    assert terms["distill"] == pytest.approx(5.0 / 5)  # one of five crops off by 5
    assert set(terms) == {"distill", "match"}


def test_coverage_picks_the_nearest_token_per_crop():
    d = 4
    g = torch.tensor([[[0.0, 0, 0, 0], [1, 1, 1, 1]]])  # (1, K=2, D)
    v = torch.tensor([[[5.0, 5, 5, 5], [0.9, 1, 1, 1.1], [0.5, 0, 0, 0]]])  # (1, C'=3, D)
    # crop 0 -> token 1 (L1 16), crop 1 -> token 1 (0.2), crop 2 -> token 0 (0.5)
    assert coverage_loss(g, v).item() == pytest.approx((16 / d + 0.2 / d + 0.5 / d) / 3)


def test_l2_targets_have_norm_sqrt_d():
    v = torch.randn(2, 3, 16).half() * 40
    t = prepare_targets(v, "l2")
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.norm(dim=-1), torch.full((2, 3), math.sqrt(16)))
    assert torch.equal(prepare_targets(v, "none"), v.float())


def test_whitening_gives_every_direction_of_the_targets_unit_variance():
    torch.manual_seed(0)
    # 8 dims, one direction of large variance (the "colour" of the scenes) over small ones
    basis = torch.linalg.qr(torch.randn(8, 8))[0]
    x = (torch.randn(20000, 8) * torch.tensor([30.0] + [1.0] * 7)) @ basis.T + 5.0
    w = fit_whitening(x, shrink=0.0)
    white = w(x)
    torch.testing.assert_close(white.mean(0), torch.zeros(8), atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.cov(white.T), torch.eye(8), atol=2e-3, rtol=0)
    assert torch.allclose(w.matrix, w.matrix.T, atol=1e-5)  # ZCA: no rotation of the axes
    # shrink damps the directions of least variance: none is scaled up by more than 1/sqrt(shrink * mean)
    damped = fit_whitening(x, shrink=0.5)
    assert torch.linalg.eigvalsh(damped.matrix).max() < torch.linalg.eigvalsh(w.matrix).max()


def test_whitened_terms_count_the_small_directions_as_much_as_the_large():
    d = 4
    w = fit_whitening(torch.randn(5000, d) * torch.tensor([10.0, 1.0, 1.0, 1.0]), shrink=0.0)
    features = torch.zeros(1, 2, d)
    local = torch.tensor([False, True])
    out = lambda z: StudentOutput(
        segments=z[:, None, :], z=z, recon=None, target=None, mask=torch.zeros(1, 4),
        keep=torch.zeros(1, 0, dtype=torch.long), patches=torch.zeros(1, 0, d), soft_assignment=torch.zeros(1, 0, 1),
    )
    loss = lambda z, norm: zeroseg_losses(out(z), features, local, LossConfig(mae=0, target_norm=norm), whitening=w)[0]
    big, small = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 0, 0]])
    assert loss(big, "none") == loss(small, "none")  # the same L1 in the raw space ...
    assert loss(small, "whiten") > 5 * loss(big, "whiten")  # ... ten times apart once whitened
    with pytest.raises(ValueError, match="whiten"):
        zeroseg_losses(out(big), features, local, LossConfig(mae=0, target_norm="whiten"))


def test_mae_loss_counts_only_masked_patches():
    target = torch.randn(2, 5, 12)
    recon = target.clone()
    mask = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
    recon[mask == 0] += 10.0  # wrong where visible: must not count
    assert mae_loss(recon, target, mask).item() == 0.0
    recon[0, 0] += 2.0  # wrong by 2 on one of three hidden patches
    assert mae_loss(recon, target, mask).item() == pytest.approx(4.0 / 3)


def test_loss_spec_parsing():
    assert LossConfig.parse("distill,match=0.5") == LossConfig(distill=1.0, match=0.5, mae=0.0)
    assert LossConfig.parse("mae").enabled() == ["mae"]
    with pytest.raises(UserError, match="unknown loss"):
        LossConfig.parse("distill,hungarian")
    with pytest.raises(UserError, match="enables no loss"):
        LossConfig.parse("distill=0")


def test_box_membership_marks_the_patches_whose_centre_is_in_the_box():
    from zeroseg.geometry import grid_boxes

    member = box_membership(grid_boxes([1, 2]), grid=4)  # (5, 16)
    assert member[0].sum() == 16  # the 1x1 crop holds every patch
    top_left = member[1].view(4, 4)
    assert top_left[:2, :2].all() and top_left.sum() == 4
    assert torch.equal(member[1:].sum(0), torch.ones(16))  # the 2x2 cells tile the grid


def test_region_loss_pools_the_visible_patches_of_each_box():
    member = box_membership(np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], dtype=np.float32), grid=2)
    patches = torch.tensor([[[1.0], [3.0], [5.0]]])  # (1, V=3, D=1) at patches 0, 1, 3
    keep = torch.tensor([[0, 1, 3]])
    targets = torch.tensor([[[3.0], [2.0], [5.0]]])  # whole: mean 3; top-left: patch 0 = 1; bottom-right: patch 3 = 5
    # errors: |3 - 3| = 0, |1 - 2| = 1, |5 - 5| = 0 -> mean 1/3
    assert region_loss(patches, keep, targets, member).item() == pytest.approx(1 / 3)
    # patch 0 hidden (the values now sit at patches 1, 2, 3): the top-left box sees nothing and is
    # left out; whole |3 - 3| = 0, bottom-right |5 - 3| = 2 -> mean 1
    hidden = torch.tensor([[1, 2, 3]])
    assert region_loss(patches, hidden, torch.tensor([[[3.0], [99.0], [3.0]]]), member).item() == pytest.approx(1.0)


def test_assign_loss_is_lowest_when_the_assignment_follows_the_nearest_token():
    segments = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, K=2, D=2)
    patches = torch.tensor([[[2.0, 0.1], [0.1, 3.0]]])  # patch 0 near token 0, patch 1 near token 1
    right = torch.tensor([[[0.99, 0.01], [0.01, 0.99]]])
    wrong = right.flip(-1)
    assert assign_loss(right, patches, segments, tau=0.1) < 0.1 < assign_loss(wrong, patches, segments, tau=0.1)


def test_recipes_set_the_model_and_losses_from_the_paper_defaults():
    from zeroseg.trainer.config import TrainConfig, recipe

    paper = recipe("paper", "tiny", steps=5)
    assert paper.model == preset("tiny") and paper.losses == LossConfig() and paper.steps == 5
    local = recipe("localised", "tiny")
    assert local.model.gumbel_noise == 0.0 and local.model.center_logits
    assert (local.losses.cover, local.losses.region, local.losses.assign) == (1.0, 1.0, 1.0)
    assert TrainConfig.from_dict(local.to_dict()) == local  # the recipe's name is saved with the run
    with pytest.raises(UserError, match="unknown recipe"):
        recipe("hungarian")


# TrainConfig.to_dict() of recipe("paper") and recipe("localised") (preset small) as the code before
# the recipes became JSON files computed it (trainer/config.py's RECIPES dict), written out here once:
# paper in full, localised as what differs from it.
TODAY = {
    "paper": {
        "model": {
            "image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4, "mlp_ratio": 4.0,
            "head_depths": [1, 1, 1], "group_tokens": [16, 8], "decoder_width": 96, "decoder_depth": 1,
            "decoder_heads": 4, "out_dim": 0, "gumbel_noise": 1.0, "assign_scale": 1.0,
            "group_residual": True, "center_logits": False,
        },
        "losses": {
            "distill": 1.0, "multiscale": True, "match": 1.0, "cover": 0.0, "mae": 1.0, "region": 0.0,
            "assign": 0.0, "assign_tau": 0.1, "target_norm": "l2",
        },
        "preset": "small", "recipe": "paper", "steps": 1000, "batch": 32, "lr": 0.001, "min_lr": 0.0,
        "warmup": 0.25, "weight_decay": 0.05, "betas": [0.9, 0.95], "grad_clip": 1.0, "mask_ratio": 0.6,
        "grids": [1, 2, 3, 4], "targets": "cached", "precision": "fp32", "seed": 0, "log_every": 10,
        "checkpoint_every": 200, "buffer_chunks": 4, "prefetch": 8, "workers": 2, "threads": 0,
        "device": "cpu",
    },
}
TODAY["localised"] = {
    **TODAY["paper"], "recipe": "localised",
    "model": {**TODAY["paper"]["model"], "gumbel_noise": 0.0, "center_logits": True},
    "losses": {**TODAY["paper"]["losses"], "cover": 1.0, "region": 1.0, "assign": 1.0},
}

# Knobs removed since (no recipe, ablation, test or benchmark set them): their only value.
REMOVED = {"model": {"assign_scale": 1.0}, "train": {"min_lr": 0.0}}


def without_removed(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k not in REMOVED["train"]}
    d["model"] = {k: v for k, v in d["model"].items() if k not in REMOVED["model"]}
    return d


@pytest.mark.parametrize("name", ["paper", "localised"])
def test_the_json_recipes_give_the_configs_of_before(name):
    from zeroseg.trainer.config import TrainConfig, recipe

    before = TODAY[name]
    assert all(before["model"][k] == v for k, v in REMOVED["model"].items())  # removed knobs held their only value
    assert all(before[k] == v for k, v in REMOVED["train"].items())
    config = recipe(name)
    # fields added since (their defaults keep the old behaviour): targets_dtype (compact targets), teacher_key,
    # model.stem (the conv stem of the shape recipe)
    want = without_removed(before)
    want = {**want, "targets_dtype": "fp16", "teacher_key": None, "model": {**want["model"], "stem": "patch"}}
    assert json.loads(json.dumps(config.to_dict())) == want
    # a config saved by the code before (removed knobs and all) still loads, as the same config
    assert TrainConfig.from_dict(before) == config


def test_a_saved_config_that_turned_a_removed_knob_is_refused():
    from zeroseg.trainer.config import TrainConfig

    for where, knob in [("model", "assign_scale"), ("train", "min_lr")]:
        saved = json.loads(json.dumps(TODAY["localised"]))
        (saved["model"] if where == "model" else saved)[knob] = 0.5
        with pytest.raises(UserError, match=f"{knob} = 0.5, a setting this zeroseg no longer has"):
            TrainConfig.from_dict(saved)


def test_one_default_recipe_and_every_recipe_says_everything():
    from zeroseg.trainer.config import TrainConfig, recipe
    from zeroseg.trainer.recipes import DEFAULT_RECIPE, RECIPE_NAMES, load_recipe

    assert DEFAULT_RECIPE == "localised" and TrainConfig() == recipe(DEFAULT_RECIPE)
    assert set(RECIPE_NAMES) >= {"paper", "localised"}
    grouping = {"gumbel_noise", "group_residual", "center_logits"}
    for name in RECIPE_NAMES:
        r = load_recipe(name)
        assert grouping <= set(r["model"]) <= grouping | {"stem"}
        assert set(r["losses"]) == {f.name for f in dataclasses.fields(LossConfig)}


def test_printing_the_model_shows_its_grouping_settings():
    from zeroseg.trainer.config import recipe

    text = repr(ZeroSegStudent(dataclasses.replace(recipe("localised", "tiny").model, out_dim=8)))
    assert "GroupingBlock(\n" in text and "gumbel_noise=0.0, residual=True, center=True\n" in text


def test_the_conv_stem_gives_the_patch_grid_and_trains():
    model = ZeroSegStudent(preset("tiny", out_dim=8, stem="conv"))  # 32 px, patch 8: three stride-2 convs
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert model.patch_embed(model.normalise(pixels)).shape == (2, 64, 4, 4)  # (B, W, S/P, S/P)
    out = model(pixels)
    out.segments.sum().backward()
    assert model.patch_embed[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not a power of 2"):
        ZeroSegStudent(preset("tiny", out_dim=8, stem="conv", patch_size=6, image_size=36))
    with pytest.raises(ValueError, match="unknown stem"):
        ZeroSegStudent(preset("tiny", out_dim=8, stem="dense"))


def test_a_store_difference_is_named():
    from zeroseg.trainer.train import store_difference

    run = {"url": "a.zarr", "n_images": 8, "grids": [1, 2], "view_size": 32, "teacher": {"arch": "A"}}
    assert store_difference(run, {**run, "url": "b.zarr", "n_images": 12}).startswith("it grew from 8 to 12 images")
    assert store_difference(run, {**run, "n_images": 6, "teacher": {"arch": "B"}}) == (
        '8 vs 6 images; teacher {"arch": "A"} vs {"arch": "B"}')
