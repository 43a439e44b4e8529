"""How a reducer combines the senders' parts of one tensor chunk: the weighted mean (hivemind's), or a rule that
one malicious sender cannot drag far (issue 17).

hivemind's butterfly all-reduce hands each peer a chunk ("part") of every averaged tensor to reduce, and
weights each sender's part by the sample count that sender claims. One peer sending its gradient with the
sign flipped and scaled, a random direction at 1000x the norm, or a huge claimed sample count moves the mean
wherever it likes. The robust rules here ignore the claimed weights (any positive weight counts as one vote;
a zero weight, a peer that joined a round with nothing to add, still counts for nothing) and bound what any
one sender can do to a part:

- ``trimmed_mean``: per coordinate, drop the ``trim`` fraction of largest and of smallest values, average
  the rest;
- ``median``: per coordinate (the mean of the two middle values for an even count);
- ``centered_clip`` (Karimireddy et al. 2021, as BTARD uses it): start from the median, then ``iterations``
  times move by the mean of each sender's difference clipped to ``clip_radius`` in L2 norm (by default the
  median distance of the senders from the median), so a far-away sender moves the result by at most
  ``clip_radius / n`` per iteration.

Before a robust rule runs, a part whose L2 norm exceeds ``outlier_norm`` times the median norm of the part's
senders is left out and reported (:func:`outliers`), so the reducer can name its sender. Every rule is
deterministic: the reducer computes each part once and sends the same bytes to every peer.

Under the mean a sender's claimed weight counts for at most ``weight_cap`` times the median of the other
senders' (:meth:`Aggregator.capped`): a peer that claims 1000x the samples it computed (BTARD's inflation
attack) counts for at most ``weight_cap`` honest peers. Weighting honest peers' gradients differently does not
bias their average (each is an estimate of the same gradient), so a peer that really computed more (a faster
GPU) loses only some of its weight, never the direction of the step.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

ROBUST = ("trimmed_mean", "median", "centered_clip")


@dataclass(frozen=True)
class Aggregator:
    """A run's aggregation rule (``averaging.aggregator`` in the run spec)."""

    kind: str = "mean"
    """``mean``, or one of :data:`ROBUST`."""
    trim: float = 0.25
    clip_radius: float | None = None
    iterations: int = 10
    outlier_norm: float = 5.0
    weight_cap: float | None = 4.0
    """(mean) The most a sender's weight counts for, as a multiple of the median of the other senders'; None:
    what it claims (hivemind's)."""
    attackers: int = 1
    """(robust kinds) How many malicious senders one group must outvote: see :attr:`min_group_size`."""

    @property
    def robust(self) -> bool:
        return self.kind in ROBUST

    @property
    def min_group_size(self) -> int:
        """The fewest peers a group averages in (``hivemind_ext/rounds.py``), also given to matchmaking as
        hivemind's ``min_group_size`` so a leader waits for that many: 2 under the mean; under a robust rule the
        smallest group in which ``attackers`` senders, all in it, are outvoted: a strict majority of honest
        senders (2f + 1, so the median and CenteredClip's centre lie among honest values), and under
        ``trimmed_mean`` also f values dropped at each end. A rule applies per group, so a bound on the
        attackers in the whole swarm is a bound on those in one group only if every group may hold them all
        (measured: 3 of 8 attackers were not bounded by groups of 3-5, docs/security.md)."""
        if not self.robust:
            return 2
        size = 2 * self.attackers + 1
        if self.kind == "trimmed_mean":
            while _trimmed_count(size, self.trim) < self.attackers:
                size += 1
        return size

    def combine(self, parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """The aggregate of ``parts`` (the senders' values of one chunk) under this rule."""
        if not self.robust:
            return weighted_mean(parts, weights)
        voting = [p for p, w in zip(parts, weights, strict=True) if w > 0] or parts
        stacked = torch.stack([p.float() for p in voting])
        if self.kind == "median":
            result = _median(stacked)
        elif self.kind == "trimmed_mean":
            result = _trimmed_mean(stacked, self.trim)
        else:
            result = _centered_clip(stacked, self.clip_radius, self.iterations)
        return result.to(parts[0].dtype)

    def capped(self, weights: list[float]) -> tuple[list[float], list[int]]:
        """(mean) ``weights`` with each positive one capped at ``weight_cap`` x the median of the other senders'
        positive weights, and the indices of those capped. Robust rules ignore the claimed weights: unchanged."""
        if self.robust or self.weight_cap is None:
            return list(weights), []
        positive = [(i, w) for i, w in enumerate(weights) if w > 0]
        result, capped = list(weights), []
        for i, weight in positive:
            others = [w for j, w in positive if j != i]
            if others and weight > (bound := self.weight_cap * statistics.median(others)):
                result[i] = bound
                capped.append(i)
        return result, capped

    def outliers(self, parts: list[torch.Tensor], weights: list[float]) -> list[int]:
        """Indices of the voting parts (weight > 0) whose norm exceeds ``outlier_norm`` x their median norm
        (none for ``mean``, or with fewer than 3 voting parts, where the median cannot tell which is off)."""
        voting = [i for i, w in enumerate(weights) if w > 0]
        if not self.robust or len(voting) < 3:
            return []
        norms = torch.stack([parts[i].float().norm() for i in voting])
        bound = self.outlier_norm * float(_median(norms[:, None])[0])
        return [i for i, norm in zip(voting, norms.tolist(), strict=True) if norm > bound and bound > 0]


def weighted_mean(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The mean of ``parts`` weighted by ``weights``, summed in the order given; where every weight is 0 (replicas
    that took no step since their last round) each part counts once."""
    if (total := sum(weights)) == 0:
        weights, total = [1.0] * len(parts), len(parts)
    return sum((p * w for p, w in zip(parts, weights, strict=True)), torch.zeros_like(parts[0])) / total


def _median(stacked: torch.Tensor) -> torch.Tensor:
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _trimmed_count(n: int, trim: float) -> int:
    """Values dropped at each end of n: at least one once there are 3 (a group of 3, or 4 with one left out as
    an outlier, would otherwise take the plain mean, attacker included: measured, the honest loss rose)."""
    return min(max(1 if trim > 0 else 0, math.floor(trim * n)), (n - 1) // 2)


def _trimmed_mean(stacked: torch.Tensor, trim: float) -> torch.Tensor:
    n = stacked.shape[0]
    cut = _trimmed_count(n, trim)
    ordered = stacked.sort(dim=0).values
    return ordered[cut : n - cut].mean(dim=0)


def _centered_clip(stacked: torch.Tensor, radius: float | None, iterations: int) -> torch.Tensor:
    center = _median(stacked)
    if radius is None:
        distances = (stacked - center).flatten(1).norm(dim=1)
        radius = float(_median(distances[:, None])[0])
    if radius <= 0:
        return center  # most senders agree exactly: the median is their value
    for _ in range(iterations):
        differences = stacked - center
        norms = differences.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (radius / norms).clamp(max=1.0).view(-1, *([1] * (stacked.dim() - 1)))
        center = center + (differences * scale).mean(dim=0)
    return center
