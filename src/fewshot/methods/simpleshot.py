"""SimpleShot (Wang, Chao, Weinberger & van der Maaten 2019): nearest centroid on transformed features of a
backbone trained as an ordinary classifier.

The backbone is trained by the run's pretraining stage (:mod:`fewshot.pretrain`; this method's
``run_defaults`` turn it on): a linear classifier over all training classes, then thrown away. A task is
classified by the nearest class centroid (squared Euclidean distance) of its support features after one
of the paper's feature transforms (``features``):

- ``CL2N``: centre by subtracting the **mean feature of the training images** (the base classes; never the
  support set's own mean), then L2-normalise (the paper's best),
- ``L2N``: L2-normalise only,
- ``UN``: the features as they are.

The centring vector is the buffer ``mean`` (saved in the checkpoint): :meth:`SimpleShot.post_train`
(called by :func:`fewshot.fit` once training ends) sets it to the exact mean over every training image.
Episodic training (the runs' few steps after pretraining, or ``fewshot train simpleshot --episodes K``)
minimises a prototypical loss on the transformed features, logits ``-scale * d^2`` with a learned
``scale`` (on L2-normalised features d^2 lies in [0, 4], so the softmax needs a temperature); there each
batch of episodes is centred by its own mean feature (its images are training images) and ``mean``
follows those batch means as a running average, as batch normalisation does, so validation during
training centres by an estimate of the training mean too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..data.images import to_float
from ..errors import FewshotError
from . import register
from .base import FeatureMethod, accuracy, infer_ways, add_log_scale
from .protonet import EncoderOptions, distance, encoder, prototypes

#: the feature transforms of the paper
FEATURES = ("CL2N", "L2N", "UN")


def transform(z: torch.Tensor, mode: str, mean: torch.Tensor) -> torch.Tensor:
    """Features ``[..., D]`` transformed as ``mode`` says: ``CL2N`` (minus ``mean``, then unit length),
    ``L2N`` (unit length) or ``UN`` (unchanged)."""
    if mode == "UN":
        return z
    if mode == "CL2N":
        z = z - mean
    return F.normalize(z, dim=-1)


@register("simpleshot")
class SimpleShot(FeatureMethod):
    """SimpleShot: nearest centroid on centred, L2-normalised features of a pretrained classifier (Wang et al. 2019)."""

    compilable = True        #: its episodic loss is a plain forward pass (no step-internal differentiation)

    #: the backbone learns in the pretraining stage; a short episodic stage with a small learning rate follows
    run_defaults = {"pretrain_epochs": 20, "train": {"episodes": 100, "lr": 1e-4, "val_every": 100}}

    @dataclass
    class Config(EncoderOptions):
        #: CL2N (subtract the training images' mean feature, then L2-normalise) | L2N (normalise) | UN (none)
        features: str = "CL2N"
        scale: float = 10.0             #: initial temperature of the episodic loss's logits -scale * d^2
        learn_scale: bool = True        #: learn that temperature during episodic training
        #: episodic training: weight of each batch's mean feature in the running estimate of the training mean
        mean_momentum: float = 0.1

    def __init__(self, config: "SimpleShot.Config", in_shape):
        super().__init__(config, in_shape)
        if config.features not in FEATURES:
            raise FewshotError(f"unknown features {config.features!r} (--features); choose from {', '.join(FEATURES)}")
        if not 0 < config.mean_momentum <= 1:
            raise FewshotError(f"mean_momentum (--mean-momentum) must be in (0, 1], got {config.mean_momentum}")
        if config.scale <= 0:
            raise FewshotError(f"scale (--scale) must be more than 0, got {config.scale}")
        self.backbone = encoder(self)
        from ..models.backbones import feature_dim
        dim = feature_dim(self.backbone, self.in_shape)
        #: the centring vector: the mean feature of the training images (set by post_train)
        self.register_buffer("mean", torch.zeros(dim))
        #: batch means folded into ``mean`` so far (the first ones are averaged evenly, then ``mean_momentum``)
        self.register_buffer("mean_updates", torch.zeros((), dtype=torch.long))
        add_log_scale(self, config.scale, config.learn_scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def feature_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[M, D]`` in fp32 (before the feature transform)."""
        return self.backbone(x).flatten(1).float()

    def _logits(self, zs, ys, zq, ways: int, mean: torch.Tensor) -> torch.Tensor:
        mode = self.config.features
        with torch.autocast(zs.device.type, enabled=False):
            protos = prototypes(transform(zs, mode, mean), ys, ways)
            return -distance(transform(zq, mode, mean), protos, "sqeuclidean") * self.log_scale.exp()

    def predict_features(self, support_z, support_y, query_z, ways=None):
        return self._logits(support_z, support_y, query_z, infer_ways(support_y, ways), self.mean)

    def loss(self, episode):
        zs, zq = self.embed_tasks(episode.support_x, episode.query_x)
        mean = self.mean
        if self.training:           # training images: centre by this batch's mean and follow it
            mean = torch.cat([zs.flatten(0, 1), zq.flatten(0, 1)]).mean(0).detach()
            with torch.no_grad():
                w = max(self.config.mean_momentum, 1.0 / float(self.mean_updates + 1))
                self.mean.lerp_(mean, w)
                self.mean_updates += 1
        logits = self._logits(zs, episode.support_y, zq, episode.ways, mean)
        loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        return loss, {"acc": float(accuracy(logits.detach(), episode.query_y).mean())}

    @torch.no_grad()
    def training_mean(self, dataset, batch: int = 256) -> torch.Tensor:
        """The mean backbone feature over every image of ``dataset`` (eval mode; training flags restored)."""
        device = self.mean.device
        flags = [(m, m.training) for m in self.modules()]
        self.eval()
        total = torch.zeros_like(self.mean, dtype=torch.float64)
        try:
            for start in range(0, dataset.num_images, batch):
                idx = torch.arange(start, min(start + batch, dataset.num_images))
                total += self.feature_vectors(to_float(dataset.take(idx).to(device))).double().sum(0)
        finally:
            for m, t in flags:
                m.training = t
        return (total / dataset.num_images).to(self.mean.dtype)

    def post_train(self, train_dataset, seed: int = 0) -> Optional[dict]:
        """Set the centring vector ``mean`` to the mean feature of every training image (the paper's)."""
        self.mean.copy_(self.training_mean(train_dataset))
        return {"centring_images": int(train_dataset.num_images), "features": self.config.features}
