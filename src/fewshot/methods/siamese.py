"""Siamese networks for verification and one-shot learning (Bromley et al. 1993; Chopra, Hadsell & LeCun
2005; Hadsell, Chopra & LeCun 2006; Koch, Zemel & Salakhutdinov 2015).

A twin encoder ``f`` with shared weights maps both inputs of a pair to embeddings; the energy of the pair
is ``E = ||f(x1) - f(x2)||_2`` (option: cosine distance ``E = 1 - cos(f(x1), f(x2))``).

Losses (means over the pairs or triplets of a training step):

- contrastive (Hadsell et al. 2006): ``Y * E^2 + (1 - Y) * max(m - E, 0)^2`` with ``Y = 1`` for a genuine
  pair (same class), ``Y = 0`` for an impostor pair, margin ``m = 1``;
- triplet (Schroff et al. 2015 form, on the energy): ``max(d(a, p) - d(a, n) + m, 0)``.

Training data comes from the trainer's episodes (N ways, K + Q images per way). In ``classic`` training
every image of a task is an anchor once; its positive is another image of its way and its negative an
image of another way, both drawn uniformly by tensor indexing from torch's global RNG (seeded and
restored on resume by the trainer). The contrastive loss uses the pairs ``(a, p, Y=1)`` and ``(a, n, Y=0)``
(exactly balanced), the triplet loss the triplets ``(a, p, n)``.

``train: reptile`` treats each class as a "domain" (Nichol et al. 2018 over tasks = classes): per task of
the episode one way is the sampled domain; anchor = its images, positive = another ordering of them,
negative = as many images of the other ways. ``inner_steps`` SGD steps at ``inner_lr`` on that batch move
``theta`` to ``theta'``; the trainer receives a surrogate loss whose gradient with respect to ``theta`` is the
mean over tasks of ``theta - theta'`` (its value is the loss at ``theta``), so the trainer's SGD at learning
rate ``epsilon`` performs the Reptile meta step ``theta <- theta + epsilon * (theta' - theta)`` (use
``--optimizer sgd --lr 0.01`` for the reported meta step 0.01).

Inference: ``predict`` labels each query with its nearest support image (logits = minus the distance to
each class's nearest support example), so N-way 1-shot evaluation is the one-shot accuracy. Verification:
a pair is "same" when its energy is at most ``threshold``, a buffer set after training to the
accuracy-maximising threshold on pairs from the training classes (:meth:`Siamese.post_train`, called by
:func:`fewshot.run.fit`, which re-saves the checkpoints with it), so checkpoints carry it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import FewshotError
from . import register
from .base import BackboneOptions, Method, accuracy, infer_ways
from .protonet import OWN_ENCODERS, make_backbone

DISTANCES = ("euclidean", "cosine")
LOSSES = ("contrastive", "triplet")
TRAINING = ("classic", "reptile")


# ------------------------------------------------------------------------------------------ pure functions
def pair_energy(z1: torch.Tensor, z2: torch.Tensor, kind: str = "euclidean") -> torch.Tensor:
    """Energy of aligned embedding pairs ``[..., D]`` -> ``[...]`` (in fp32)."""
    z1, z2 = z1.float(), z2.float()
    if kind == "euclidean":
        # the 1e-12 keeps the gradient of the root finite for identical embeddings
        return ((z1 - z2).pow(2).sum(-1) + 1e-12).sqrt()
    if kind == "cosine":
        return 1 - F.cosine_similarity(z1, z2, dim=-1, eps=1e-8)
    raise FewshotError(f"unknown distance {kind!r}; choose from {', '.join(DISTANCES)}")


def cross_energy(q: torch.Tensor, s: torch.Tensor, kind: str = "euclidean") -> torch.Tensor:
    """Energies between every query ``[B, M, D]`` and every support example ``[B, S, D]`` -> ``[B, M, S]``."""
    q, s = q.float(), s.float()
    if kind == "euclidean":
        return torch.cdist(q, s, compute_mode="donot_use_mm_for_euclid_dist")
    if kind == "cosine":
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        sn = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return 1 - qn @ sn.transpose(1, 2)
    raise FewshotError(f"unknown distance {kind!r}; choose from {', '.join(DISTANCES)}")


def contrastive_loss(energy: torch.Tensor, same: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean of ``Y E^2 + (1 - Y) max(m - E, 0)^2`` (Hadsell et al. 2006); ``same`` is Y (1 or 0)."""
    y = same.to(energy.dtype)
    return (y * energy.pow(2) + (1 - y) * (margin - energy).clamp_min(0).pow(2)).mean()


def triplet_loss(d_pos: torch.Tensor, d_neg: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean of ``max(d(a, p) - d(a, n) + m, 0)``."""
    return (d_pos - d_neg + margin).clamp_min(0).mean()


def nearest_support_logits(energy: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Logits ``[B, M, ways]`` = minus the energy to each class's nearest support example, from the
    query-support energies ``[B, M, S]`` and support labels ``[B, S]``."""
    onehot = F.one_hot(support_y, ways).bool()                          # [B, S, N]
    if bool((~onehot.any(1)).any()):
        raise FewshotError("every class of a task needs at least one support example")
    masked = energy.unsqueeze(-1).masked_fill(~onehot.unsqueeze(1), math.inf)   # [B, M, S, N]
    return -masked.amin(2)


def best_threshold(energy: torch.Tensor, same: torch.Tensor) -> tuple:
    """The accuracy-maximising threshold ``t`` for the rule "same iff energy <= t" on labelled pairs.

    Candidates are the midpoints between consecutive distinct sorted energies, plus one below the smallest
    (everything "different") and one above the largest (everything "same"). Returns ``(t, accuracy)``;
    among equally accurate thresholds the smallest wins.
    """
    e = energy.detach().double().flatten()
    y = same.detach().flatten().to(torch.float64)
    if e.numel() == 0:
        raise FewshotError("threshold calibration needs at least one pair")
    if not bool(torch.isfinite(e).all()):
        raise FewshotError("threshold calibration got non-finite distances (has training diverged?)")
    order = e.argsort()
    e, y = e[order], y[order]
    n = e.numel()
    # cut i: the i smallest energies are called "same" (i = 0..n)
    same_below = torch.cat([e.new_zeros(1), y.cumsum(0)])                # genuine pairs called same
    diff_above = (1 - y).sum() - torch.cat([e.new_zeros(1), (1 - y).cumsum(0)])   # impostors called different
    correct = same_below + diff_above
    valid = torch.ones(n + 1, dtype=torch.bool)
    valid[1:n] = e[1:] > e[:-1]                                           # never cut between equal energies
    correct = torch.where(valid, correct, torch.full_like(correct, -1.0))
    i = int(correct.argmax())
    if i == 0:
        t = float(e[0]) - 1.0
    elif i == n:
        t = float(e[-1]) + 1.0
    else:
        t = 0.5 * float(e[i - 1] + e[i])
    return t, float(correct[i]) / n


# ------------------------------------------------------------------------------------------ encoders
class FaceEncoder(nn.Module):
    """The small face-verification encoder: conv(6, 3x3) -> max-pool 2 -> dropout -> conv(12, 3x3) ->
    max-pool 2 -> dropout -> dense 128 -> dense ``embedding`` (ReLU after the hidden layers)."""

    def __init__(self, in_shape, embedding: int = 50, dropout: float = 0.1):
        super().__init__()
        if len(in_shape) != 3 or min(in_shape[1:]) < 8:
            raise FewshotError(f"the faces encoder needs images of at least 8x8 pixels, got shape {tuple(in_shape)}")
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(6, 12, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout), nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.head = nn.Sequential(nn.Linear(n, 128), nn.ReLU(), nn.Linear(128, embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ------------------------------------------------------------------------------------------ method
@register("siamese")
class Siamese(Method):
    """Siamese network: twin encoder, contrastive or triplet loss, nearest-support one-shot (Koch et al. 2015)."""

    #: Koch et al. / the face experiment train on batches of 128 pairs: 16 ways x 4 images give 64 anchors,
    #: each with one genuine and one impostor partner
    run_defaults = {"ways": 16, "shots": 1, "queries": 3}

    @dataclass
    class Config(BackboneOptions):
        #: auto (conv4 for images, mlp for vectors) | conv4 | mlp | faces | any other backbone name,
        #: package.module:factory, path/to/file.py:factory or timm:NAME
        backbone: str = "auto"
        hidden: int = 64                #: conv4 channels
        mlp_hidden: List[int] = field(default_factory=lambda: [128, 128])   #: dense encoder (audio: 128-128-128)
        embedding: int = 0              #: output size of the mlp (0: 128) and faces (0: 50) encoders
        dropout: float = 0.1            #: faces encoder dropout
        distance: str = "euclidean"     #: euclidean | cosine
        loss: str = "contrastive"       #: contrastive | triplet
        margin: float = 1.0             #: m
        train: str = "classic"          #: classic | reptile (over class "domains")
        inner_steps: int = 30           #: reptile: SGD steps on the domain batch
        inner_lr: float = 1e-3          #: reptile: inner SGD learning rate
        calibration_pairs: int = 2000   #: training pairs used to calibrate the same/different threshold

    def __init__(self, config: "Siamese.Config", in_shape):
        super().__init__(config, in_shape)
        for value, allowed, what in ((config.distance, DISTANCES, "distance"), (config.loss, LOSSES, "loss"),
                                     (config.train, TRAINING, "train")):
            if value not in allowed:
                raise FewshotError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        if config.margin <= 0:
            raise FewshotError(f"margin must be positive, got {config.margin}")
        if config.train == "reptile" and (config.inner_steps < 1 or config.inner_lr <= 0):
            raise FewshotError("reptile needs inner_steps >= 1 and inner_lr > 0")
        if config.calibration_pairs < 2:
            raise FewshotError(f"calibration_pairs must be at least 2, got {config.calibration_pairs}")
        if config.embedding < 0:
            raise FewshotError(f"embedding must be positive (or 0 for the encoder's default), got {config.embedding}")
        def own(kind):
            if kind == "faces":
                return FaceEncoder(self.in_shape, config.embedding or 50, config.dropout)
            if kind in OWN_ENCODERS:
                return make_backbone(kind, self.in_shape, config.hidden, config.mlp_hidden, config.embedding or 128)
            return None
        self.backbone = self.make_backbone(own=own)
        #: same/different threshold on the energy (NaN until calibrated)
        self.register_buffer("threshold", torch.tensor(float("nan")))

    # ---------------------------------------------------------------- embeddings and energies
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def energy(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Energies ``[P]`` of image pairs ``[P, ...]`` (both through the same encoder in one pass)."""
        z = self.backbone(torch.cat([x1, x2]))
        with torch.autocast(z.device.type, enabled=False):
            return pair_energy(z[:len(x1)], z[len(x1):], self.config.distance)

    def same(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Same/different decisions ``[P]`` (bool) at the calibrated threshold."""
        if not self.calibrated:
            raise FewshotError("the same/different threshold is not calibrated (train with `fewshot train`, "
                               "or call calibrate())")
        return self.energy(x1, x2) <= self.threshold

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def _embed_tasks(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        return self.backbone(x.flatten(0, 1)).view(B, T, -1)

    def predict(self, support_x, support_y, query_x, ways=None):
        ways = infer_ways(support_y, ways)
        S = support_x.shape[1]
        z = self._embed_tasks(torch.cat([support_x, query_x], 1))
        with torch.autocast(z.device.type, enabled=False):
            e = cross_energy(z[:, S:], z[:, :S], self.config.distance)
            return nearest_support_logits(e, support_y, ways)

    # ---------------------------------------------------------------- training
    @staticmethod
    def _partners(y: torch.Tensor, ways: int, per_way: int) -> tuple:
        """For labels ``[B, T]`` ordered way by way (``per_way`` examples each): the index of a positive
        (another example of the same way) and of a negative (an example of another way) for every example,
        drawn from torch's global RNG. Returns two ``[B, T]`` index tensors into the task's examples."""
        B, T = y.shape
        dev = y.device
        pos_in_way = torch.arange(T, device=dev) % per_way                      # position within its way
        shift = torch.randint(1, per_way, (B, T), device=dev)
        pos = y * per_way + (pos_in_way + shift) % per_way
        other_way = (y + torch.randint(1, ways, (B, T), device=dev)) % ways
        neg = other_way * per_way + torch.randint(0, per_way, (B, T), device=dev)
        return pos, neg

    def _objective(self, za, zp, zn) -> tuple:
        """Loss and metrics of aligned anchor/positive/negative embeddings ``[..., D]``."""
        c = self.config
        d_pos = pair_energy(za, zp, c.distance).flatten()
        d_neg = pair_energy(za, zn, c.distance).flatten()
        if c.loss == "contrastive":
            energy = torch.cat([d_pos, d_neg])
            same = torch.cat([torch.ones_like(d_pos), torch.zeros_like(d_neg)])
            loss = contrastive_loss(energy, same, c.margin)
        else:
            loss = triplet_loss(d_pos, d_neg, c.margin)
        with torch.no_grad():
            metrics = {"d_same": float(d_pos.mean()), "d_diff": float(d_neg.mean()),
                       "triplet_acc": float((d_pos < d_neg).float().mean())}
        return loss, metrics

    def _episode_layout(self, episode) -> tuple:
        """All images of each task, way by way: ``x [B, N*(K+Q), ...]``, labels ``[B, N*(K+Q)]``."""
        N, K, Q = episode.ways, episode.shots, episode.queries
        if N < 2:
            raise FewshotError("the siamese network trains on pairs of classes: use at least 2 ways")
        if K + Q < 2:
            raise FewshotError("genuine pairs need 2 images of a class: use shots + queries >= 2")
        B = episode.batch
        shape = episode.support_x.shape[2:]
        sx = episode.support_x.view(B, N, K, *shape)
        qx = episode.query_x.view(B, N, Q, *shape)
        x = torch.cat([sx, qx], 2).flatten(1, 2)
        y = torch.arange(N, device=x.device).repeat_interleave(K + Q).expand(B, -1)
        return x, y, K + Q

    def loss(self, episode):
        if self.config.train == "reptile":
            return self._reptile_loss(episode)
        x, y, per_way = self._episode_layout(episode)
        pos, neg = self._partners(y, episode.ways, per_way)
        z = self._embed_tasks(x)
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            zp = torch.gather(z, 1, pos.unsqueeze(-1).expand_as(z))
            zn = torch.gather(z, 1, neg.unsqueeze(-1).expand_as(z))
            loss, metrics = self._objective(z, zp, zn)
            if episode.queries:
                metrics["acc"] = self._episode_accuracy(z.detach(), episode)
        metrics[self.config.loss] = float(loss.detach())
        return loss, metrics

    def _episode_accuracy(self, z: torch.Tensor, episode) -> float:
        """Nearest-support accuracy of the episode's queries from the embeddings laid out way by way."""
        N, K, Q = episode.ways, episode.shots, episode.queries
        B = z.shape[0]
        zw = z.view(B, N, K + Q, -1)
        zs, zq = zw[:, :, :K].flatten(1, 2), zw[:, :, K:].flatten(1, 2)
        ys = torch.arange(N, device=z.device).repeat_interleave(K).expand(B, -1)
        yq = torch.arange(N, device=z.device).repeat_interleave(Q).expand(B, -1)
        logits = nearest_support_logits(cross_energy(zq, zs, self.config.distance), ys, N)
        return float(accuracy(logits, yq).mean())

    # ---------------------------------------------------------------- Reptile over class domains
    def domain_batches(self, x: torch.Tensor, y: torch.Tensor, ways: int, per_way: int) -> tuple:
        """One task's Reptile batch: a random way is the domain; anchors = its ``per_way`` images,
        positives = the same images in another order (each with a different partner), negatives =
        ``per_way`` images drawn from the other ways. ``x [T, ...]`` is laid out way by way."""
        dev = x.device
        d = int(torch.randint(ways, (1,)))
        anchor = d * per_way + torch.arange(per_way, device=dev)
        shift = torch.randint(1, per_way, (1,), device=dev)
        positive = d * per_way + (torch.arange(per_way, device=dev) + shift) % per_way
        other = (d + torch.randint(1, ways, (per_way,), device=dev)) % ways
        negative = other * per_way + torch.randint(0, per_way, (per_way,), device=dev)
        return x[anchor], x[positive], x[negative]

    def inner_adapt(self, xa, xp, xn, steps: int | None = None, lr: float | None = None) -> tuple:
        """``steps`` plain SGD steps of the loss on one anchor/positive/negative batch, from the current
        weights; returns ``(adapted parameters, loss at the start, loss at the end)`` (no graph kept)."""
        c = self.config
        steps = c.inner_steps if steps is None else steps
        lr = c.inner_lr if lr is None else lr
        params = {k: p.detach().clone().requires_grad_(True) for k, p in self.backbone.named_parameters()}
        x = torch.cat([xa, xp, xn])
        n = len(xa)
        first = last = float("nan")
        for s in range(steps + 1):
            with torch.enable_grad():
                z = functional_call(self.backbone, params, (x,))
                with torch.autocast(z.device.type, enabled=False):
                    z = z.float()
                    loss, _ = self._objective(z[:n], z[n:2 * n], z[2 * n:])
                if s == 0:
                    first = float(loss.detach())
                last = float(loss.detach())
                if s == steps:
                    break
                grads = torch.autograd.grad(loss, list(params.values()))
            params = {k: (p - lr * g).detach().requires_grad_(True) for (k, p), g in zip(params.items(), grads)}
        return {k: p.detach() for k, p in params.items()}, first, last

    def reptile_surrogate(self, adapted: list) -> torch.Tensor:
        """A scalar whose gradient w.r.t. each backbone parameter ``theta`` is ``mean_i (theta - theta'_i)``
        over the adapted parameter dicts ``adapted`` (its value is 0)."""
        sur = None
        for k, p in self.backbone.named_parameters():
            delta = torch.stack([(p.detach() - a[k]) for a in adapted]).mean(0)
            term = (p * delta.to(p.dtype)).sum()
            sur = term if sur is None else sur + term
        return sur - sur.detach()

    def _reptile_loss(self, episode):
        x, y, per_way = self._episode_layout(episode)
        adapted, starts, ends = [], [], []
        for b in range(episode.batch):
            xa, xp, xn = self.domain_batches(x[b], y[b], episode.ways, per_way)
            params, first, last = self.inner_adapt(xa, xp, xn)
            adapted.append(params)
            starts.append(first)
            ends.append(last)
        value = sum(starts) / len(starts)
        loss = self.reptile_surrogate(adapted) + value
        metrics = {"inner_start": value, "inner_end": sum(ends) / len(ends)}
        if episode.queries:
            with torch.no_grad():
                metrics["acc"] = self._episode_accuracy(self._embed_tasks(x).float(), episode)
        return loss, metrics

    # ---------------------------------------------------------------- verification
    @torch.no_grad()
    def pair_energies(self, sampler, pairs: int, chunk: int = 512) -> tuple:
        """Energies and labels of ``pairs`` pairs (balanced chunks) from a :class:`PairSampler`."""
        es, ys = [], []
        left = int(pairs)
        while left > 0:
            sampler.batch = min(chunk, left + (left % 2))
            p = sampler.sample()
            es.append(self.energy(p.x1, p.x2).float())
            ys.append(p.same)
            left -= sampler.batch
        return torch.cat(es), torch.cat(ys)

    @torch.no_grad()
    def calibrate(self, dataset, seed: int = 0, pairs: int | None = None) -> dict:
        """Set ``threshold`` to the accuracy-maximising energy threshold on balanced pairs from ``dataset``
        (the training classes); returns ``{"threshold", "train_binary_acc", "pairs"}``."""
        from ..data.pairs import PairSampler
        pairs = int(pairs or self.config.calibration_pairs)
        dev = self.threshold.device
        was_training = self.training
        self.eval()
        try:
            sampler = PairSampler(dataset, 2, device=dev, seed=seed)
            e, y = self.pair_energies(sampler, pairs)
        finally:
            self.train(was_training)
        t, acc = best_threshold(e, y)
        self.threshold.fill_(t)
        return {"threshold": t, "train_binary_acc": 100.0 * acc, "pairs": int(e.numel())}

    def post_train(self, train_dataset, seed: int = 0) -> dict:
        """Called by :func:`fewshot.run.fit` on each saved checkpoint: calibrate the threshold on training pairs."""
        return self.calibrate(train_dataset, seed=seed)

    @torch.no_grad()
    def pair_metrics(self, dataset, pairs: int = 1000, seed: int = 0) -> dict:
        """Binary accuracy (same/different at the calibrated threshold, balanced pairs) and triplet accuracy
        (share of triplets with ``d(a, p) < d(a, n)``) on ``dataset``, in percent with 95% normal CIs."""
        from ..data.pairs import PairSampler, TripletSampler
        if not self.calibrated:
            raise FewshotError("the same/different threshold is not calibrated (the run was not finished by "
                               "`fewshot train`); retrain, call calibrate(), or skip pair metrics with --pairs 0")
        pairs = int(pairs)
        if pairs < 2:
            raise FewshotError(f"pairs must be at least 2, got {pairs}")
        dev = self.threshold.device
        was_training = self.training
        self.eval()
        try:
            e, y = self.pair_energies(PairSampler(dataset, 2, device=dev, seed=seed), pairs)
            tri = TripletSampler(dataset, 2, device=dev, seed=seed + 1)
            wins, left = [], pairs
            while left > 0:
                tri.batch = min(512, left)
                t = tri.sample()
                z = self.backbone(torch.cat([t.anchor, t.positive, t.negative])).float()
                za, zp, zn = z.chunk(3)
                wins.append(pair_energy(za, zp, self.config.distance) < pair_energy(za, zn, self.config.distance))
                left -= tri.batch
        finally:
            self.train(was_training)
        correct = ((e <= self.threshold).long() == y).float()
        won = torch.cat(wins).float()

        def pct(v):
            p = float(v.mean())
            return 100.0 * p, 100.0 * 1.96 * math.sqrt(p * (1 - p) / v.numel())

        b, bci = pct(correct)
        tr, tci = pct(won)
        return {"binary_acc": b, "binary_ci95": bci, "pairs": int(e.numel()), "threshold": float(self.threshold),
                "triplet_acc": tr, "triplet_ci95": tci, "triplets": int(won.numel()),
                "genuine_acc": 100.0 * float(correct[y == 1].mean()),
                "impostor_acc": 100.0 * float(correct[y == 0].mean())}
