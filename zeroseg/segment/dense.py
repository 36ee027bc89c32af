"""The training-free baseline a practitioner tries first: the teacher's own dense features.

MaskCLIP (Zhou et al. 2022, "Extract Free Dense Labels from CLIP") reads CLIP's last layer at every
spatial position instead of pooling it, keeping only the parts of the pooling that act per
position, so each position lands in the space of the text embeddings:

- ViT tower (open_clip VisionTransformer): the last transformer block is run with its query-key
  attention skipped, i.e. every token attends only to itself, so the attention reduces to the
  value projection and the out projection of the token itself; the block's residual, its MLP
  (as in MaskCLIP's code), then ln_post and proj are applied to every patch token. Both block
  kinds of open_clip (nn.MultiheadAttention in ResidualAttentionBlock, its own Attention in
  CustomResidualAttentionBlock) are run through their own attention with a self-only mask, so
  layer scale, head scale and inner norms are kept as the block has them.
  The `clearclip` variant (after ClearCLIP, Lan et al. 2024) drops that block's residual and MLP:
  ln_post(out_proj(value(token))) @ proj. ClearCLIP found the residual to carry most of the noise;
  it also uses query-query attention, which is left out here (self-only attention is kept).
- ResNet tower (open_clip ModifiedResNet): the attention pool's value projection and c_proj applied
  to the last feature map at each position, without the positional embedding (as MaskCLIP does):
  with uniform attention and no positional embedding the pool's output is exactly their mean
  over positions (tests/test_dense.py checks this).

The variant follows the tower type; `clearclip` is for ViT towers only.

The input is the whole image squashed to a square (zeroshot.student_input), at `scale` times the
teacher's input side: the same pixels the 4x4 grid baseline cuts its cells from (a ResNet at its
32 px input gives a single position). A ViT's positional embedding is resized (bicubic, as
open_clip resizes it for checkpoints) to the larger patch grid. Each position is labelled by its
nearest class text embedding (cosine); the per-class similarity maps are upsampled (bilinear, as
MaskCLIP) to the image, and the background threshold is applied by the caller like any other.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock, VisionTransformer

from zeroseg.errors import UserError
from zeroseg.segment.zeroshot import Raw, Vocabulary, student_input

VARIANTS = ("maskclip", "clearclip")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UserError(f"unknown dense variant {variant!r}: {' | '.join(VARIANTS)}")


def dense_features(teacher, pixels: torch.Tensor, variant: str = "maskclip") -> torch.Tensor:
    """pixels (B, 3, H, W) float in [0, 1] (any side the tower's stride divides) -> (B, D, h, w)
    float32 features in the space of the teacher's image embeddings, not normalised."""
    check_variant(variant)
    visual = teacher.model.visual
    x = teacher.normalise(pixels)
    if isinstance(visual, VisionTransformer):
        return _vit_dense(visual, x, variant)
    if isinstance(visual, ModifiedResNet):
        if variant != "maskclip":
            raise UserError(f"the {variant} variant is for ViT towers; {teacher.info.arch} is a ResNet")
        return _resnet_dense(visual, x)
    raise UserError(f"no dense read-out for {teacher.info.arch}: its image tower is a {type(visual).__name__}, "
                    "not an open_clip VisionTransformer or ModifiedResNet")


def _resnet_dense(visual: ModifiedResNet, x: torch.Tensor) -> torch.Tensor:
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))  # (B, C, h, w)
    pool = visual.attnpool
    tokens = pool.c_proj(pool.v_proj(x.permute(0, 2, 3, 1)))  # (B, h, w, D): per position
    return tokens.permute(0, 3, 1, 2).float()


def _vit_dense(visual: VisionTransformer, x: torch.Tensor, variant: str) -> torch.Tensor:
    if visual.attn_pool is not None:
        raise UserError("no dense read-out for a ViT with an attentional pooler (CoCa): its tokens are pooled queries")
    if not visual.transformer.batch_first:
        raise UserError("no dense read-out for a ViT built with batch_first=False")
    patches = visual.conv1(x)  # (B, width, h, w)
    b, _, h, w = patches.shape
    tokens = patches.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(tokens.dtype)
    positions = _positions(visual.positional_embedding, tuple(visual.grid_size), (h, w))
    tokens = torch.cat([cls, tokens], dim=1) + positions.to(tokens.dtype)
    tokens = visual.ln_pre(tokens)  # patch dropout is off in eval
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = block(tokens)
    last = blocks[-1]
    self_only = torch.full((tokens.shape[1],) * 2, float("-inf"), dtype=tokens.dtype, device=tokens.device)
    self_only.fill_diagonal_(0.0)  # softmax of one finite logit: each token's own value, weight 1
    if variant == "maskclip":
        tokens = last(tokens, attn_mask=self_only)
    else:  # clearclip: the attention branch alone, no residual, no MLP
        tokens = _attention_branch(last, last.ln_1(tokens), self_only)
    out = visual.ln_post(tokens[:, 1:]) @ visual.proj  # (B, h*w, D)
    return out.transpose(1, 2).reshape(b, -1, h, w).float()


def _attention_branch(block, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The attention term a block adds to its residual stream (layer scale included)."""
    if isinstance(block, ResidualAttentionBlock):
        return block.ls_1(block.attention(q_x=x, attn_mask=mask))
    if isinstance(block, CustomResidualAttentionBlock):
        return block.ls_1(block.ln_attn(block.attn(x, attn_mask=mask)))
    raise UserError(f"no dense read-out for transformer blocks of type {type(block).__name__}")


def _positions(pos: torch.Tensor, trained: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The class token's embedding and the patch grid's (`trained` rows x columns), resized to
    `grid` when it differs."""
    if trained == grid:
        return pos
    cls, patches = pos[:1], pos[1:]
    patches = patches.reshape(1, *trained, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


class DensePredictor:
    """The teacher alone, read densely as MaskCLIP (Zhou et al. 2022) does; training-free: what a
    practitioner gets from CLIP without a student or a grid of crops. The read-out follows the
    tower type:
    - ViT: the last block with each token attending only to itself (its value through the out
      projection, the block's residual and MLP), ln_post and proj on every patch token;
      variant="clearclip" keeps only that block's attention branch (no residual, no MLP);
    - ResNet: the attention pool's v_proj and c_proj at every position of the last feature map.
    The image is squashed to `scale` x the teacher's input side (the 4x4 grid baseline's pixels);
    each position takes its nearest class text embedding (cosine), the per-class similarities are
    upsampled (bilinear) to the image, and the caller's background threshold applies to them."""

    name = "dense"

    def __init__(self, teacher, vocab: Vocabulary, scale: int = 4, variant: str = "maskclip"):
        check_variant(variant)
        self.teacher, self.vocab, self.variant = teacher, vocab, variant
        self.size = scale * teacher.info.input_size

    @torch.inference_mode()
    def raw(self, images: list[np.ndarray]) -> list[Raw]:
        views = np.stack([student_input(im, self.size) for im in images])
        pixels = torch.from_numpy(views).permute(0, 3, 1, 2).float().div(255)
        features = F.normalize(dense_features(self.teacher, pixels, self.variant), dim=1)  # (B, D, h, w)
        sims = torch.einsum("bdhw,vd->bvhw", features.cpu(), self.vocab.embeddings)
        out = []
        for im, s in zip(images, sims):
            up = F.interpolate(s[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0]
            score, best = up.max(0)
            out.append(Raw(self.vocab.class_ids[best].to(torch.uint8).numpy(), score.numpy()))
        return out
