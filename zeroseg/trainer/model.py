"""The ZeroSeg student (PAPER.md, "Student"), in one file, shapes in comments.

    pixels (B,S,S,3) uint8
      -> normalise, patchify                     tokens (B, N, W), N = (S/P)^2, + fixed 2D sin-cos pos
      -> MAE random masking (training only)      visible (B, V, W), V = N - round(N * mask_ratio)
      -> ViT encoder (depth blocks)              (B, V, W)
      -> segmentation head:
           [visible ; 32 group tokens] -> head_depths[0] blocks -> grouping block 1 -> (B, 32, W)
           [32 tokens ; 8 group tokens] -> head_depths[1] blocks -> grouping block 2 -> (B, 8, W)
           8 tokens -> head_depths[2] blocks                                     -> (B, 8, W)
      -> segment tokens g = LN + Linear          (B, K=8, D)   D = the teacher's dim
         and the patch-to-segment assignment, hard and soft, the two groupings' composed (B, V, K)
      -> patch embeddings = LN + Linear over the encoded patches                  (B, V, D)
      -> global z = 1 block over segment tokens, average pool, MLP              (B, D)
      -> MAE decoder over [visible ; mask tokens] (B, N, P*P*3) reconstructions of normalised patches

Choices where PAPER.md is silent (the paper follows MAE and GroupViT; so do we):
- No class token: nothing reads it (z comes from the segment tokens).
- Fixed 2D sin-cos position embeddings in the encoder and decoder, as MAE.
- The head has the encoder's width; the grouping block is GroupViT's (cross-attention of the group
  tokens over the patch tokens, then an assignment attention whose softmax is over the group axis,
  hard straight-through Gumbel-softmax in training, argmax at inference; each group's new token is
  the mean of its assigned tokens, with GroupViT's +1 in the denominator, plus its group token).
- The head sees only the visible patches in training (the hidden ones carry no image content);
  at inference every patch is visible, so the hard assignment covers the whole patch grid.
- Pixels are normalised with the ImageNet mean/std; the MAE target is each patch normalised by its
  own mean and variance (MAE's norm_pix_loss), and its loss covers the masked patches only.
- An input whose side differs from image_size is resized (bilinear, antialiased) to image_size, so
  a store's view may be larger than the student's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 224  # S, the student's input side
    patch_size: int = 16  # P
    width: int = 768  # W, encoder and head
    depth: int = 12  # encoder blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    head_depths: tuple[int, int, int] = (2, 2, 1)  # head blocks before grouping 1, before 2, after 2
    group_tokens: tuple[int, int] = (32, 8)  # learnable group tokens of grouping blocks 1 and 2
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    out_dim: int = 0  # D, the teacher's embedding dim; 0 = not yet known (set from the store)
    # Scale of the Gumbel noise added to the assignment logits in training (1.0 = GroupViT's
    # gumbel_softmax, tau 1; 0 = the hard argmax with the soft straight-through gradient).
    gumbel_noise: float = 1.0
    # GroupViT adds each group token to its gathered mean. With it an empty group's token can still
    # describe anything (its group token attended to the whole image), so the tokens need not come
    # from their patches and the hard assignment (the mask) is left untrained. False: a segment
    # token is made from its own patches only.
    group_residual: bool = True
    # Subtract each group's mean logit over the tokens before the softmax over groups: removes the
    # per-group offset (q_g . mean_n k_n) that lets one group win every token.
    center_logits: bool = False
    # How pixels become tokens: "patch" (ViT's linear P x P patch embedding) or "conv" (Xiao et al.
    # 2021, "Early convolutions help transformers see better": stride-2 3x3 convolutions down to
    # the patch grid, then a 1x1). Measured here: shape at the scale of a few patches is read by
    # the conv stem, not by the patch embedding (docs/results.md). With MAE masking the conv stem
    # lets a visible token see a few pixels of its hidden neighbours (its receptive field is wider
    # than a patch): the masked patches are still never encoded.
    stem: str = "patch"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{**d, "head_depths": tuple(d["head_depths"]), "group_tokens": tuple(d["group_tokens"])})


# Named presets, as open_clip's factory names its model configs.
PRESETS: dict[str, ModelConfig] = {
    # tests: a step in well under a second on one CPU core
    "tiny": ModelConfig(
        image_size=32, patch_size=8, width=64, depth=2, heads=2, head_depths=(1, 1, 1),
        group_tokens=(8, 4), decoder_width=32, decoder_depth=1, decoder_heads=2,
    ),
    # the synthetic demo: trains to something useful in a few CPU minutes (one block per head
    # stage: the head runs over every visible token plus the group tokens, so it dominates)
    "small": ModelConfig(
        image_size=64, patch_size=8, width=128, depth=4, heads=4, head_depths=(1, 1, 1),
        group_tokens=(16, 8), decoder_width=96, decoder_depth=1, decoder_heads=4,
    ),
    # the paper's: ViT-B/16 encoder, 5-layer head, 8-layer decoder, 32 then 8 groups
    "base": ModelConfig(),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (have: {', '.join(PRESETS)})")
    return replace(PRESETS[name], **overrides)


# ---- building blocks ---------------------------------------------------------------------------


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """(grid*grid, width) fixed 2D sin-cos position embeddings (half the channels for y, half x)."""
    assert width % 4 == 0, "width must be divisible by 4 for 2D sin-cos embeddings"
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angles = pos[:, None] * omega[None]  # (N, W/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # (N, W)


class Attention(nn.Module):
    """Multi-head attention of queries x over keys/values `context` (self-attention when None)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, w = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, n, W/H)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, m, W/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, n, W/H)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Mlp(nn.Sequential):
    def __init__(self, width: int, hidden: int, out: int | None = None):
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out or width))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def hard_gumbel_softmax(logits: torch.Tensor, noise: float, dim: int) -> torch.Tensor:
    """One-hot argmax of logits + noise * Gumbel(0, 1) along dim, with the gradient of the softmax
    of the same noisy logits (straight-through). noise=1 is torch's gumbel_softmax(tau=1, hard=True)."""
    if noise > 0:
        gumbels = -torch.empty_like(logits).exponential_().log()
        logits = logits + noise * gumbels
    soft = logits.softmax(dim)
    hard = F.one_hot(soft.argmax(dim), soft.shape[dim]).movedim(-1, dim).to(soft.dtype)
    return hard - soft.detach() + soft


class GroupingBlock(nn.Module):
    """GroupViT's grouping: G group tokens gather the n input tokens into G new tokens.

    Returns the new tokens (B, G, W), the hard assignment (B, n, G), one-hot over G, and the soft
    one (the softmax over G of the noiseless logits). In training the hard assignment is a
    straight-through Gumbel-softmax sample (its gradient is the soft one's); at inference it is the
    argmax.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, gumbel_noise: float = 1.0, residual: bool = True, center: bool = False):
        super().__init__()
        self.gumbel_noise, self.residual, self.center = gumbel_noise, residual, center
        self.norm_tokens, self.norm_groups = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = Attention(width, heads)  # group tokens look at the tokens before assigning
        self.norm_cross = nn.LayerNorm(width)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.norm_out = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def extra_repr(self) -> str:
        return f"gumbel_noise={self.gumbel_noise}, residual={self.residual}, center={self.center}"

    def forward(self, tokens: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.norm_tokens(tokens)  # (B, n, W)
        g = self.norm_groups(groups)  # (B, G, W)
        g = g + self.cross(g, x)
        g = self.norm_cross(g)
        logits = self.q(g) @ self.k(x).transpose(1, 2) * (1.0 / math.sqrt(x.shape[-1]))  # (B, G, n)
        if self.center:
            logits = logits - logits.mean(dim=2, keepdim=True)
        soft = logits.float().softmax(dim=1)  # (B, G, n), before any noise
        if self.training:
            assign = hard_gumbel_softmax(logits.float(), self.gumbel_noise, dim=1)  # one-hot over G, soft gradient
        else:
            assign = F.one_hot(logits.argmax(dim=1), logits.shape[1]).transpose(1, 2).float()  # (B, G, n)
        assign = assign.to(x.dtype)
        gathered = assign @ self.v(x) / (assign.sum(dim=2, keepdim=True) + 1.0)  # (B, G, W): mean of members
        out = self.proj(gathered) + g if self.residual else self.proj(gathered)
        out = out + self.mlp(self.norm_out(out))
        return out, assign.transpose(1, 2), soft.transpose(1, 2)  # (B, G, W), (B, n, G), (B, n, G)


class Segments(NamedTuple):
    tokens: torch.Tensor  # (B, K, D) float32 segment embeddings in the teacher's space
    assignment: torch.Tensor  # (B, h, w) long in [0, K): hard patch-to-segment assignment
    patches: torch.Tensor  # (B, h*w, D) float32 patch embeddings in the teacher's space (the region term's)


class StudentOutput(NamedTuple):
    segments: torch.Tensor  # (B, K, D) segment tokens g_i
    z: torch.Tensor  # (B, D) global vector
    recon: torch.Tensor | None  # (B, N, P*P*3) decoder's reconstruction, None when nothing is masked
    target: torch.Tensor | None  # (B, N, P*P*3) per-patch normalised pixels
    mask: torch.Tensor  # (B, N) 1.0 where the patch was hidden from the encoder
    keep: torch.Tensor  # (B, V) indices of the visible patches
    patches: torch.Tensor  # (B, V, D) the visible patches' embeddings in the teacher's space
    soft_assignment: torch.Tensor  # (B, V, K) soft patch-to-segment assignment, both groupings composed


def conv_stem(width: int, patch: int) -> nn.Sequential:
    """(B, 3, S, S) -> (B, W, S/P, S/P): log2(P) stride-2 3x3 convolutions, channels doubling up to
    W, each with GroupNorm (one group: batch-independent, so data-parallel replicas stay exact)
    and GELU, then a 1x1 convolution to W."""
    layers, c_in = [], 3
    n = int(math.log2(patch))
    for i in range(n):
        c_out = width // 2 ** (n - 1 - i)
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]
        c_in = c_out
    return nn.Sequential(*layers, nn.Conv2d(c_in, width, 1))


# ---- the student -------------------------------------------------------------------------------


class ZeroSegStudent(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.out_dim <= 0:
            raise ValueError("ModelConfig.out_dim (the teacher's dim) must be set")
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        if config.stem not in ("patch", "conv"):
            raise ValueError(f"unknown stem {config.stem!r} (patch or conv)")
        if config.stem == "conv" and config.patch_size & (config.patch_size - 1):
            raise ValueError(f"the conv stem halves the side down to the patch grid: patch_size {config.patch_size} is not a power of 2")
        if len(config.head_depths) != len(config.group_tokens) + 1:
            raise ValueError("head_depths needs one more entry than group_tokens (blocks after the last grouping)")
        self.config = c = config
        w, p = c.width, c.patch_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        # encoder
        self.patch_embed = conv_stem(w, p) if c.stem == "conv" else nn.Conv2d(3, w, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed(w, c.grid)[None], persistent=False)  # (1, N, W)
        self.encoder = nn.ModuleList(Block(w, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(w)

        # segmentation head
        self.group_tokens = nn.ParameterList(nn.Parameter(torch.randn(1, n, w) * 0.02) for n in c.group_tokens)
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(w, c.heads, c.mlp_ratio) for _ in range(d)) for d in c.head_depths
        )
        self.grouping = nn.ModuleList(GroupingBlock(w, c.heads, c.mlp_ratio, c.gumbel_noise, c.group_residual, c.center_logits) for _ in c.group_tokens)
        self.segment_norm = nn.LayerNorm(w)
        self.segment_proj = nn.Linear(w, c.out_dim)
        # each encoded patch in the teacher's space, for the region and assignment losses
        self.patch_proj = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, c.out_dim))

        # global vector z
        self.global_block = Block(w, c.heads, c.mlp_ratio)
        self.global_mlp = Mlp(w, w, c.out_dim)

        # MAE decoder
        dw = c.decoder_width
        self.decoder_embed = nn.Linear(w, dw)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dw) * 0.02)
        self.register_buffer("decoder_pos", sincos_pos_embed(dw, c.grid)[None], persistent=False)  # (1, N, dw)
        self.decoder = nn.ModuleList(Block(dw, c.decoder_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dw)
        self.decoder_pred = nn.Linear(dw, p * p * 3)

        self.apply(_init_weights)

    # ---- pieces ------------------------------------------------------------------------------

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, s, s, 3) uint8 -> (B, 3, S, S) float, ImageNet-normalised, resized to image_size."""
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            size = (self.config.image_size, self.config.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, P*P*3), row-major patches, pixels (py, px, channel) in each."""
        b, p, g = x.shape[0], self.config.patch_size, self.config.grid
        x = x.reshape(b, 3, g, p, g, p)
        return torch.einsum("bcyixj->byxijc", x).reshape(b, g * g, p * p * 3)

    @staticmethod
    def random_masking(b: int, n: int, ratio: float, device) -> tuple[torch.Tensor, torch.Tensor]:
        """MAE's per-sample random masking: keep (B, V) indices of visible patches (sorted by a random
        score) and mask (B, N), 1.0 at exactly round(N * ratio) hidden patches per image."""
        n_keep = n - round(n * ratio)
        order = torch.rand(b, n, device=device).argsort(dim=1)  # (B, N) random permutation
        keep = order[:, :n_keep]  # (B, V)
        mask = torch.ones(b, n, device=device)
        mask.scatter_(1, keep, 0.0)
        return keep, mask

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoded tokens (B, n, W) -> segment tokens (B, K, W) and the patch-to-segment
        assignments, hard (one-hot) and soft, (B, n, K) each: the groupings' composed."""
        hard = soft = None
        for stage, grouping, groups in zip(self.stages, self.grouping, self.group_tokens):
            n = x.shape[1]
            y = torch.cat([x, groups.expand(x.shape[0], -1, -1)], dim=1)  # (B, n + G, W)
            for block in stage:
                y = block(y)
            x, h, s = grouping(y[:, :n], y[:, n:])  # (B, G, W), (B, n, G) twice
            hard, soft = (h, s) if hard is None else (hard @ h, soft @ s)  # a one-hot @ one-hot stays one-hot
        for block in self.stages[-1]:  # the blocks after the last grouping
            x = block(x)
        return x, hard, soft

    def decode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Visible encoded tokens (B, V, W) at indices keep (B, V) -> reconstructions (B, N, P*P*3)."""
        b, n = x.shape[0], self.config.n_patches
        y = self.decoder_embed(x)  # (B, V, dw)
        full = self.mask_token.to(y.dtype).expand(b, n, -1).clone()  # (B, N, dw)
        full.scatter_(1, keep[..., None].expand(-1, -1, y.shape[-1]), y)
        full = full + self.decoder_pos
        for block in self.decoder:
            full = block(full)
        return self.decoder_pred(self.decoder_norm(full))

    # ---- training forward / inference ----------------------------------------------------------

    def forward(self, pixels: torch.Tensor, mask_ratio: float = 0.0, reconstruct: bool = True) -> StudentOutput:
        """pixels (B, s, s, 3) uint8; random masking with mask_ratio (uses torch's global RNG)."""
        img = self.normalise(pixels)  # (B, 3, S, S)
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, W)
        b, n, w = x.shape
        keep, mask = self.random_masking(b, n, mask_ratio, x.device)  # (B, V), (B, N)
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, w))  # (B, V, W)
        for block in self.encoder:
            x = block(x)
        x = self.encoder_norm(x)

        seg, _, soft = self.head(x)  # (B, K, W), (B, V, K)
        segments = self.segment_proj(self.segment_norm(seg))  # (B, K, D)
        patches = self.patch_proj(x)  # (B, V, D)
        z = self.global_mlp(self.global_block(seg).mean(dim=1))  # (B, D)

        recon = target = None
        if reconstruct and mask.sum() > 0:
            recon = self.decode(x, keep)  # (B, N, P*P*3)
            pixel_patches = self.patchify(img)  # (B, N, P*P*3)
            mu, var = pixel_patches.mean(dim=-1, keepdim=True), pixel_patches.var(dim=-1, keepdim=True)
            target = (pixel_patches - mu) / (var + 1e-6).sqrt()
        return StudentOutput(segments.float(), z.float(), recon, target, mask, keep, patches.float(), soft)

    @torch.no_grad()
    def segment(self, pixels: torch.Tensor) -> Segments:
        """Inference: the whole image visible, argmax grouping. pixels (B, s, s, 3) uint8."""
        was_training = self.training
        self.eval()
        try:
            img = self.normalise(pixels)
            x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, W)
            for block in self.encoder:
                x = block(x)
            x = self.encoder_norm(x)
            seg, hard, _ = self.head(x)  # (B, K, W), (B, N, K)
            tokens = self.segment_proj(self.segment_norm(seg)).float()  # (B, K, D)
            patches = self.patch_proj(x).float()  # (B, N, D)
            g = self.config.grid
            assignment = hard.argmax(dim=-1).view(-1, g, g)  # (B, h, w)
        finally:
            self.train(was_training)
        return Segments(tokens, assignment, patches)


def _init_weights(m: nn.Module) -> None:
    """MAE's init: xavier-uniform linears (and the patch conv as a linear), zero biases, unit LN."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
