"""Relation networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018, "Learning to Compare: Relation
Network for Few-Shot Learning", CVPR).

An embedding module f and a relation module g score how related a query x_j is to a class n:

    r_{n,j} = sigmoid(g(concat(c_n, f(x_j)))) in [0, 1],

trained by regression, not classification: the loss is the mean squared error between every score and the
one-hot target 1[y_j = n] (the mean over the B*M*N pairs of a batch). Three variants:

- **Images** (the paper's few-shot model): f = four conv blocks (conv 3x3 with padding 1, batch norm, ReLU)
  with a 2x2 max-pool after the first two only, so f keeps a spatial map of H/4 x W/4 (7x7 for 28x28
  Omniglot, 21x21 for 84x84 mini-ImageNet; the paper's unpadded convolutions give 5x5 and 19x19). The class
  side c_n is the *sum* of the K support feature maps of class n (the paper's K-shot rule; ``shot_pooling
  mean`` averages them instead, so a model trained with one K can be tested at another). g = two conv
  blocks (conv 3x3 padding 1, batch norm, ReLU, max-pool 2) on the channel-concatenated pair, then
  Linear -> ReLU -> Linear(1) with ``relation_hidden`` = 8 units; images need at least 16 pixels a side.
- **Vectors** (``backbone mlp``, or auto for vector inputs): f = an MLP encoder, g = an MLP
  (2D -> ``mlp_relation_hidden`` -> 1) scoring every query against every support *sample*; a class's score is
  the **mean** of the sigmoid scores of its K samples (so it stays in [0, 1] and the MSE target keeps its
  meaning for any K), r_{n,j} = (1/K) Σ_{i: y_i = n} sigmoid(g(f(x_i), f(x_j))).
- **Zero-shot** (``zero_shot``): the class side is the class's semantic vector a_n (attributes, word vector)
  embedded by its own MLP h (A -> ``attr_hidden`` -> D, ReLU after each layer, as in the paper), paired with
  each query's flat image embedding f(x_j) (Conv-4 for images, MLP for vectors) and scored by the relation
  MLP: r_{n,j} = sigmoid(g(concat(h(a_n), f(x_j)))). The support images are not used. ``attr_dim`` (A) is
  filled in by the run from ``--attributes``.

``predict`` returns log r (log-sigmoid of the relation logit; for the vector variant the log of the mean,
as a logsumexp): its argmax is the class with the highest relation score, and its softmax is the scores
normalised to sum to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from ..models import MLP
from ..models.backbones import feature_dim
from . import register
from .base import BackboneOptions, Method, accuracy, infer_ways
from .protonet import make_backbone

ZERO_SHOT_NEEDS = "zero-shot relation network needs --attributes CLASS_VECTORS.csv"


def conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    """conv 3x3 (padding 1), batch norm, ReLU and, when ``pool``, a 2x2 max-pool."""
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def relation_targets(query_y: torch.Tensor, ways: int) -> torch.Tensor:
    """The regression targets 1[y_j = n]: query labels ``[B, M]`` -> one-hot ``[B, M, ways]`` floats."""
    return F.one_hot(query_y, ways).float()


def class_sums(z: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """Sum of the support features of each class: ``z`` ``[B, S, ...]``, labels ``[B, S]`` -> ``[B, ways, ...]``."""
    onehot = F.one_hot(y, ways).to(z.dtype)                            # [B, S, N]
    if bool((onehot.sum(1) == 0).any()):
        raise FewshotError("every class of a task needs at least one support example")
    return (onehot.transpose(1, 2) @ z.flatten(2)).view(z.shape[0], ways, *z.shape[2:])


def class_mean_log_scores(pair_logits: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """log of the mean sigmoid score of each class's support samples: pair logits ``[B, M, S]`` with support
    labels ``[B, S]`` -> ``[B, M, ways]`` (logsumexp of log-sigmoids minus log K_n)."""
    onehot = F.one_hot(y, ways).bool()                                 # [B, S, N]
    counts = onehot.sum(1)                                             # [B, N]
    if bool((counts == 0).any()):
        raise FewshotError("every class of a task needs at least one support example")
    ls = F.logsigmoid(pair_logits).unsqueeze(-1).masked_fill(~onehot.unsqueeze(1), float("-inf"))
    return ls.logsumexp(2) - counts.to(ls.dtype).log().unsqueeze(1)


@register("relation")
class RelationNet(Method):
    """Relation network: a learned comparison module scores query-class pairs in [0, 1] (Sung et al. 2018)."""

    @dataclass
    class Config(BackboneOptions):
        #: conv4 for images (the paper's conv feature maps), mlp for vectors; any other backbone (a name,
        #: package.module:factory, file.py:factory, timm:NAME) is a vector encoder compared by the MLP
        backbone: str = "auto"
        hidden: int = 64                #: channels of the embedding and relation conv blocks
        relation_hidden: int = 8        #: units of the relation module's hidden linear layer (images)
        mlp_hidden: List[int] = field(default_factory=lambda: [256, 256])   #: vector / zero-shot MLP encoder
        embedding: int = 64             #: MLP encoder output size
        mlp_relation_hidden: int = 400  #: hidden units of the relation MLP (vectors, zero-shot; paper: 400 on AwA)
        zero_shot: bool = False         #: compare queries with class semantic vectors (needs --attributes)
        attr_dim: int = 0               #: length A of the semantic vectors (filled in from the data)
        attr_hidden: int = 1024         #: hidden units of the semantic-vector MLP (zero-shot; paper: 1024 on AwA)
        #: how K support feature maps of a class combine (images): "sum" (the paper; train with the K you test
        #: with) or "mean" (a model trained with one K stays in distribution at another K)
        shot_pooling: str = "sum"

    run_defaults = {"ways": 5, "shots": 1, "queries": 19, "val_queries": 15}

    def __init__(self, config: "RelationNet.Config", in_shape):
        super().__init__(config, in_shape)
        c = config
        for k in ("hidden", "relation_hidden", "embedding", "mlp_relation_hidden", "attr_hidden"):
            if int(getattr(c, k)) < 1:
                raise FewshotError(f"{k} must be at least 1, got {getattr(c, k)}")
        if c.shot_pooling not in ("sum", "mean"):
            raise FewshotError(f"unknown shot_pooling {c.shot_pooling!r}; choose sum or mean")
        kind = c.backbone
        if kind == "auto":
            kind = "conv4" if len(self.in_shape) == 3 else "mlp"
        own = self._build.backbone is None and kind in ("conv4", "mlp")
        self.kind = "zero_shot" if c.zero_shot else ("image" if own and kind == "conv4" else "vector")
        if self.kind == "zero_shot":
            if c.attr_dim < 1:
                raise FewshotError(ZERO_SHOT_NEEDS)
            self.encoder = self.make_backbone(own=lambda k: make_backbone(k, self.in_shape, c.hidden, c.mlp_hidden,
                                                                          c.embedding) if own else None)
            dim = feature_dim(self.encoder, self.in_shape)
            self.attr_net = nn.Sequential(nn.Linear(c.attr_dim, c.attr_hidden), nn.ReLU(inplace=True),
                                          nn.Linear(c.attr_hidden, dim), nn.ReLU(inplace=True))
            self.relation = self._relation_mlp(dim)
        elif self.kind == "image":
            if len(self.in_shape) != 3:
                raise FewshotError(f"conv4 needs image inputs (C, H, W), got shape {self.in_shape}")
            if min(self.in_shape[1:]) < 16:  # two pools in f and two in g
                raise FewshotError(f"the relation network needs images of at least 16x16 pixels, got "
                                   f"{self.in_shape[1]}x{self.in_shape[2]}")
            h = c.hidden
            self.encoder = self.make_backbone(own=lambda k: nn.Sequential(
                conv_block(self.in_shape[0], h, True), conv_block(h, h, True), conv_block(h, h, False),
                conv_block(h, h, False)))
            side = [s // 2 // 2 // 2 // 2 for s in self.in_shape[1:]]
            self.relation = nn.Sequential(conv_block(2 * h, h, True), conv_block(h, h, True), nn.Flatten(),
                                          nn.Linear(h * side[0] * side[1], c.relation_hidden),
                                          nn.ReLU(inplace=True), nn.Linear(c.relation_hidden, 1))
        elif own:
            self.encoder = self.make_backbone(own=lambda k: MLP(int(torch.Size(self.in_shape).numel()),
                                                                tuple(c.mlp_hidden), c.embedding))
            self.relation = self._relation_mlp(c.embedding)
        else:
            self.encoder = self.make_backbone()
            self.relation = self._relation_mlp(feature_dim(self.encoder, self.in_shape))

    def _relation_mlp(self, dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(2 * dim, self.config.mlp_relation_hidden), nn.ReLU(inplace=True),
                             nn.Linear(self.config.mlp_relation_hidden, 1))

    # ------------------------------------------------------------------ pieces
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the feature map (images), or the flat embedding (vectors, zero-shot)."""
        return self.encoder(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """f over ``[B, M, ...]`` -> ``[B, M, ...features]``."""
        z = self.encoder(x.flatten(0, 1))
        return z.view(x.shape[0], x.shape[1], *z.shape[1:])

    def _pair_logits(self, cls: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """g(concat(c_n, f(x_j))) before the sigmoid: class side ``[B, N, ...]`` and queries ``[B, M, ...]``
        (same feature shape) -> ``[B, M, N]`` (the class side first in the concatenation, as in the paper)."""
        B, N, M = cls.shape[0], cls.shape[1], zq.shape[1]
        a = cls.unsqueeze(1).expand(B, M, N, *cls.shape[2:])
        b = zq.unsqueeze(2).expand(B, M, N, *zq.shape[2:])
        pairs = torch.cat([a, b], dim=3)                    # dim 3: channels (maps) or features (vectors)
        return self.relation(pairs.flatten(0, 2)).view(B, M, N)

    def log_scores(self, support_x, support_y, query_x, ways: int) -> torch.Tensor:
        """log r ``[B, M, ways]`` for image or vector support sets (the few-shot variants)."""
        if self.kind == "zero_shot":
            return self.zero_shot_log_scores(support_x, support_y, query_x, ways)
        B, S = support_x.shape[:2]
        z = self._encode(torch.cat([support_x, query_x], 1))
        zs, zq = z[:, :S], z[:, S:]
        if self.kind == "image":
            cls = class_sums(zs, support_y, ways)
            if self.config.shot_pooling == "mean":
                counts = F.one_hot(support_y, ways).sum(1).to(cls.dtype)        # [B, N]
                cls = cls / counts.view(*counts.shape, *([1] * (cls.dim() - 2)))
            logits = self._pair_logits(cls, zq)
            with torch.autocast(logits.device.type, enabled=False):
                return F.logsigmoid(logits.float())
        logits = self._pair_logits(zs, zq)                  # every query against every support sample
        with torch.autocast(logits.device.type, enabled=False):
            return class_mean_log_scores(logits.float(), support_y, ways)

    def zero_shot_log_scores(self, attributes, labels, query_x, ways: int) -> torch.Tensor:
        """log r ``[B, M, ways]`` from class vectors ``[B, C, A]`` with labels ``[B, C]`` (usually arange(ways);
        vectors sharing a label are averaged) and query images ``[B, M, ...]``."""
        A = self.config.attr_dim
        if attributes.dim() != 3 or attributes.shape[-1] != A:
            raise FewshotError(f"the zero-shot relation network compares queries with class vectors: "
                               f"expected support of shape [tasks, ways, {A}], got {tuple(attributes.shape)}")
        onehot = F.one_hot(labels, ways).to(attributes.dtype)            # [B, C, N]
        counts = onehot.sum(1)
        if bool((counts == 0).any()):
            raise FewshotError("every class of a task needs a semantic vector")
        vec = (onehot.transpose(1, 2) @ attributes) / counts.unsqueeze(-1)   # [B, N, A]
        cls = self.attr_net(vec.flatten(0, 1)).view(vec.shape[0], ways, -1)
        zq = self._encode(query_x).flatten(2)
        logits = self._pair_logits(cls.to(zq.dtype), zq)
        with torch.autocast(logits.device.type, enabled=False):
            return F.logsigmoid(logits.float())

    def _episode_attributes(self, episode) -> torch.Tensor:
        attrs = episode.extra.get("attributes")
        if attrs is None:
            raise FewshotError(ZERO_SHOT_NEEDS)
        return attrs.to(episode.query_x.device, torch.float32)

    # ------------------------------------------------------------------ the contract
    def predict(self, support_x, support_y, query_x, ways=None):
        """log relation scores ``[B, M, ways]``; in zero-shot mode ``support_x`` holds one semantic vector per
        class ``[B, N, attr_dim]`` with ``support_y`` = arange(N)."""
        ways = infer_ways(support_y, ways)
        return self.log_scores(support_x, support_y, query_x, ways)

    def predict_episode(self, episode):
        if self.kind != "zero_shot":
            return self.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)
        attrs = self._episode_attributes(episode)
        labels = torch.arange(episode.ways, device=attrs.device).expand(attrs.shape[0], episode.ways)
        return self.zero_shot_log_scores(attrs, labels, episode.query_x, episode.ways)

    def loss(self, episode):
        log_r = self.predict_episode(episode)
        with torch.autocast(log_r.device.type, enabled=False):
            target = relation_targets(episode.query_y, episode.ways)
            loss = F.mse_loss(log_r.float().exp(), target)
        acc = float(accuracy(log_r.detach(), episode.query_y).mean())
        # (not named "mse": run metrics with an "mse" key are read as regression runs)
        return loss, {"relation_mse": float(loss.detach()), "acc": acc}

