"""The three ZeroSeg losses (PAPER.md, "Losses"), each switchable and weighted from the config,
and three terms the paper does not have (cover, region, assign: the "localised" recipe's).

L1 is reduced as a mean over the feature dims (torch's l1_loss convention) rather than eq. 1's sum:
a constant factor 1/D that leaves every min and every gradient direction unchanged, and keeps the
weights comparable across teachers of different dims. Segment matching sums over nothing else:
it is eq. 1 averaged over segment tokens and images.

Targets: the store keeps the teacher's raw features; PAPER.md does not say whether they were
normalised. Raw CLIP features have norms that vary with the crop; zero-shot inference compares by
cosine, so only directions matter. `target_norm="l2"` (the default) puts every target on the
sphere of radius sqrt(D), i.e. unit L2 norm scaled so each dim has unit RMS: the L1 terms are then
O(1) like the MAE term, for any D. `"none"` regresses the raw features. `"whiten"` (not in the
paper) puts them on the sphere as l2 does, then measures every L1 term after a ZCA whitening of
the targets (Whitening, fitted on the store's targets): the student still predicts the teacher's
space, but each direction of the targets counts by how it tells crops apart, not by its variance.
It tested whether a few directions of large variance (colour, on the synthetic scenes) decide the
L1 terms while shape goes unlearnt: measured, it makes every student collapse to one label per
image (docs/results.md, "Whitened targets"); kept so that those rows can be run again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zeroseg.errors import UserError
from zeroseg.trainer.model import StudentOutput

TERMS = ("distill", "match", "mae", "cover", "region", "assign")


@dataclass(frozen=True)
class LossConfig:
    distill: float = 1.0  # multi-scale distillation: L1(z, v_j) over every crop, 1x1 included
    multiscale: bool = True  # False: distil z to the 1x1 crop only (the paper's table 4 "base")
    match: float = 1.0  # segment matching, eq. 1: sum_i min_j L1(g_i, v_j) over local crops
    # Not in the paper: eq. 1's reverse direction, each local crop's L1 to its nearest segment
    # token (with match, a Chamfer distance). Eq. 1 alone is minimised by all K tokens copying
    # the one easiest crop of the image, which is what short runs learn; 0 = the paper's losses.
    cover: float = 0.0
    mae: float = 1.0  # MAE reconstruction MSE on the masked patches
    # Not in the paper: each crop's feature distilled into the mean of the student's patch
    # embeddings inside the crop's box. 30 localised targets per image teach the patches what
    # they show, where eq. 1 gives the grouping one gradient through a straight-through sample.
    region: float = 0.0
    # Not in the paper: the soft patch-to-segment assignment is pulled (cross entropy) towards
    # each patch's nearest segment tokens in the teacher's space (softmax of cosines / assign_tau),
    # so the mask follows what the patches show rather than a per-group bias.
    assign: float = 0.0
    assign_tau: float = 0.1
    target_norm: str = "l2"  # "l2" | "none" | "whiten", see the module docstring

    def enabled(self) -> list[str]:
        return [t for t in TERMS if getattr(self, t) > 0]

    @classmethod
    def parse(cls, spec: str, target_norm: str = "l2", multiscale: bool = True) -> LossConfig:
        """"distill,match=0.5" -> only those terms on, each weight 1 unless given."""
        weights = dict.fromkeys(TERMS, 0.0)
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, w = item.partition("=")
            if name not in TERMS:
                raise UserError(f"unknown loss {name!r} (have: {', '.join(TERMS)})")
            weights[name] = float(w) if w else 1.0
        if not any(weights.values()):
            raise UserError(f"--loss {spec!r} enables no loss")
        return cls(**weights, multiscale=multiscale, target_norm=target_norm)


def prepare_targets(features: torch.Tensor, norm: str) -> torch.Tensor:
    """(B, C, D) teacher features (any float dtype) -> float32 targets (before any whitening)."""
    v = features.float()
    if norm in ("l2", "whiten"):
        return F.normalize(v, dim=-1) * math.sqrt(v.shape[-1])
    if norm == "none":
        return v
    raise ValueError(f"unknown target_norm {norm!r} (have: l2, none, whiten)")


@dataclass(frozen=True)
class Whitening:
    """x (..., D) -> (x - mean) @ matrix: ZCA whitening, the targets' covariance made the identity."""

    mean: torch.Tensor  # (D,)
    matrix: torch.Tensor  # (D, D), symmetric

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix

    def to(self, device: torch.device | str) -> Whitening:
        return Whitening(self.mean.to(device), self.matrix.to(device))


def fit_whitening(targets: torch.Tensor, shrink: float = 0.01) -> Whitening:
    """targets (N, D), as prepare_targets made them -> their ZCA whitening. `shrink` times the mean
    eigenvalue is added to every eigenvalue, so directions of almost no variance (noise) are not
    blown up."""
    x = targets.double()
    mean = x.mean(0)
    eigval, eigvec = torch.linalg.eigh(torch.cov((x - mean).T))
    eigval = eigval.clamp(min=0) + shrink * eigval.mean()
    return Whitening(mean.float(), ((eigvec * eigval.rsqrt()) @ eigvec.T).float())


def distill_loss(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """z (B, D), targets (B, C, D): mean over images and crops of the per-dim-mean L1."""
    return (z[:, None, :] - targets).abs().mean()


def token_crop_l1(segments: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
    """segments (B, K, D), local_targets (B, C', D) -> (B, K, C') per-dim-mean L1 distances."""
    return (segments[:, :, None, :] - local_targets[:, None, :, :]).abs().mean(dim=-1)


def matching_loss(segments: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
    """segments (B, K, D), local_targets (B, C', D) (the 1x1 crop already removed):
    eq. 1, each segment token's L1 to its nearest crop feature, averaged over tokens and images."""
    return token_crop_l1(segments, local_targets).min(dim=2).values.mean()


def coverage_loss(segments: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
    """segments (B, K, D), local_targets (B, C', D): each crop's L1 to its nearest segment token,
    averaged over crops and images (eq. 1 with the roles of tokens and crops swapped)."""
    return token_crop_l1(segments, local_targets).min(dim=1).values.mean()


def region_loss(patches: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """patches (B, V, D) at patch indices keep (B, V); targets (B, C, D); member (C, N): each
    crop's L1 to the mean of its visible patches, over the crops with any patch visible."""
    visible = member[:, keep].transpose(0, 1)  # (B, C, V)
    count = visible.sum(-1)  # (B, C)
    pooled = visible @ patches / count.clamp(min=1)[..., None]  # (B, C, D)
    seen = (count > 0).float()
    return ((pooled - targets).abs().mean(-1) * seen).sum() / seen.sum().clamp(min=1)


def assign_loss(soft: torch.Tensor, patches: torch.Tensor, segments: torch.Tensor, tau: float) -> torch.Tensor:
    """soft (B, V, K) assignment; patches (B, V, D), segments (B, K, D): cross entropy from the
    softmax over K of cos(patch, token) / tau (a fixed target) to the soft assignment."""
    with torch.no_grad():
        target = (F.normalize(patches, dim=-1) @ F.normalize(segments, dim=-1).transpose(1, 2) / tau).softmax(-1)
    return -(target * soft.clamp(min=1e-6).log()).sum(-1).mean()


def mae_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """recon, target (B, N, P*P*3), mask (B, N) 1 = hidden: MSE per patch, mean over hidden patches."""
    per_patch = (recon.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def zeroseg_losses(
    out: StudentOutput, features: torch.Tensor, local: torch.Tensor, config: LossConfig,
    member: torch.Tensor | None = None, whitening: Whitening | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total and each enabled term's value (unweighted) for logging.

    features (B, C, D): the teacher's features of the selected crops; local (C,) bool, False at the
    1x1 crop (excluded from segment matching, kept for distillation). With no local crop at all
    (grids 1 only) there is nothing to match and the term is left out, as in the paper's table 3.
    member (C, N): box_membership of the crops, needed by the region term. whitening: the targets'
    (fit_whitening), needed by target_norm "whiten"; every L1 term is measured after it.
    """
    if config.target_norm == "whiten" and whitening is None:
        raise ValueError('target_norm "whiten" needs the targets\' whitening')
    space = whitening if config.target_norm == "whiten" else (lambda x: x)
    targets = space(prepare_targets(features, config.target_norm))
    segments = space(out.segments.float())
    terms: dict[str, torch.Tensor] = {}
    if config.distill > 0:
        terms["distill"] = distill_loss(space(out.z.float()), targets if config.multiscale else targets[:, ~local])
    if config.match > 0 and local.any():
        terms["match"] = matching_loss(segments, targets[:, local])
    if config.cover > 0 and local.any():
        terms["cover"] = coverage_loss(segments, targets[:, local])
    if config.region > 0:  # the whitening is affine, so whitening the patches whitens their means
        terms["region"] = region_loss(space(out.patches.float()), out.keep, targets, member)
    if config.assign > 0:
        terms["assign"] = assign_loss(out.soft_assignment, out.patches.float(), out.segments.float(), config.assign_tau)
    if config.mae > 0 and out.recon is not None:
        terms["mae"] = mae_loss(out.recon, out.target, out.mask)
    total = sum(getattr(config, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}
