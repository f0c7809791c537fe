"""Prototypical networks (Snell, Swersky & Zemel 2017).

Prototype c_k = mean of the support embeddings of class k; p(y = k | x) = softmax_k(-d(f(x), c_k)) and the
loss is the NLL of the query labels. Distances: Euclidean (the default: the plain ``cdist``, as easyfsl and
the MLP-encoder variant use it), squared Euclidean (Snell et al.'s), cosine (d = 1 - cos, norms clamped at
1e-8) and dot (d = -x.y). Optional L2 weight penalty lambda * sum 1/2 ||theta||^2 inside the loss, and an
optional learned scale on the logits.

Why Euclidean by default: trained the same way (Omniglot small sets, 60-way 5-shot, Adam 1e-3, Conv-4), the
squared distance scored 3.9 points below easyfsl's prototypical network on a within-alphabet 20-way 1-shot
test and the plain distance level with it (BENCHMARKS.md, "Within-alphabet"). ``distance: sqeuclidean``
gives the paper's network (the Omniglot recipes pin it: their documented results were measured with it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from ..models import MLP, Conv1d, Conv4
from . import register
from .base import BackboneOptions, FeatureMethod, Method, accuracy, infer_ways, add_log_scale

DISTANCES = ("sqeuclidean", "euclidean", "cosine", "dot")


def prototypes(z: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means: embeddings ``[B, S, D]`` with labels ``[B, S]`` in ``0..ways-1`` -> ``[B, ways, D]``."""
    onehot = F.one_hot(y, ways).to(z.dtype)                       # [B, S, N]
    sums = onehot.transpose(1, 2) @ z                              # [B, N, D]
    counts = onehot.sum(1).unsqueeze(-1)                           # [B, N, 1]
    if bool((counts == 0).any()):
        raise FewshotError("every class of a task needs at least one support example")
    return sums / counts


def distance(q: torch.Tensor, c: torch.Tensor, kind: str = "sqeuclidean") -> torch.Tensor:
    """Pairwise distances between queries ``[B, M, D]`` and prototypes ``[B, N, D]`` -> ``[B, M, N]``."""
    if kind in ("sqeuclidean", "euclidean"):
        d = (q.pow(2).sum(-1, keepdim=True) + c.pow(2).sum(-1).unsqueeze(1)
             - 2 * q @ c.transpose(1, 2)).clamp_min(0)
        return d if kind == "sqeuclidean" else d.clamp_min(1e-12).sqrt()
    if kind == "cosine":
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        cn = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return 1 - qn @ cn.transpose(1, 2)
    if kind == "dot":
        return -(q @ c.transpose(1, 2))
    raise FewshotError(f"unknown distance {kind!r}; choose from {', '.join(DISTANCES)}")


def make_backbone(kind: str, in_shape, hidden: int, mlp_hidden, embedding: int) -> nn.Module:
    if kind == "auto":
        kind = "conv4" if len(in_shape) == 3 else "mlp"
    if kind == "conv4":
        if len(in_shape) != 3:
            raise FewshotError(f"conv4 needs image inputs (C, H, W), got shape {tuple(in_shape)}")
        if min(in_shape[1:]) < 16:  # four 2x2 max-pools need at least 16 pixels a side
            raise FewshotError(f"conv4 needs images of at least 16x16 pixels, got {in_shape[1]}x{in_shape[2]}")
        return Conv4(in_shape[0], hidden)
    if kind == "mlp":
        return MLP(int(torch.Size(in_shape).numel()), tuple(mlp_hidden), embedding)
    if kind == "conv1d":  # feature maps [1, F, T] (MFCCs): the F rows are channels, convolutions over time
        if len(in_shape) != 3 or in_shape[0] != 1:
            raise FewshotError(f"conv1d needs feature maps (1, F, T) such as MFCCs, got shape {tuple(in_shape)}")
        return Conv1d(in_shape[1], hidden)
    raise FewshotError(f"unknown backbone {kind!r}; choose conv4, conv1d, mlp or auto")


#: the encoder names the metric methods build with :func:`make_backbone` (fewshot.models' own networks)
OWN_ENCODERS = ("auto", "conv4", "mlp", "conv1d")


@dataclass
class EncoderOptions(BackboneOptions):
    """The embedding-network options shared by the metric methods (their Configs extend this)."""
    #: auto (conv4 for images, mlp for vectors) | conv4 | conv1d (audio feature maps) | mlp | any other
    #: backbone name (resnet12, resnet18, ...), package.module:factory, path/to/file.py:factory, timm:NAME
    backbone: str = "auto"
    hidden: int = 64                #: conv4 channels
    mlp_hidden: List[int] = field(default_factory=lambda: [256, 256])  #: mlp hidden sizes
    embedding: int = 64             #: mlp output size


def encoder(method: Method) -> nn.Module:
    """The encoder of a method whose Config extends :class:`EncoderOptions`, through
    :meth:`Method.make_backbone` (the names of :data:`OWN_ENCODERS` by :func:`make_backbone`)."""
    c, shape = method.config, method.in_shape
    return method.make_backbone(own=lambda kind: make_backbone(kind, shape, c.hidden, c.mlp_hidden, c.embedding)
                                if kind in OWN_ENCODERS else None)


@register("protonet")
class ProtoNet(FeatureMethod):
    """Prototypical network: nearest class mean in an embedding space (Snell et al. 2017)."""

    compilable = True        #: one forward pass and the distances: torch.compile traces it whole

    @dataclass
    class Config(EncoderOptions):
        distance: str = "euclidean"     #: sqeuclidean | euclidean | cosine | dot
        l2_penalty: float = 0.0         #: lambda of the in-loss weight penalty (0.05 in one variant)
        learn_scale: bool = False       #: learn a temperature multiplying the logits
        scale: float = 1.0              #: (initial) temperature
        #: in training, embed the support and the queries in two forward passes (each its own batch-norm
        #: statistics, as easyfsl's ProtoNet does) instead of one; evaluation (running statistics) is the same
        separate_passes: bool = False

    def __init__(self, config: "ProtoNet.Config", in_shape):
        super().__init__(config, in_shape)
        if config.distance not in DISTANCES:
            raise FewshotError(f"unknown distance {config.distance!r}; choose from {', '.join(DISTANCES)}")
        self.backbone = encoder(self)
        add_log_scale(self, config.scale, config.learn_scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed_tasks(self, support_x: torch.Tensor, query_x: torch.Tensor) -> tuple:
        if not (self.config.separate_passes and self.training):
            return super().embed_tasks(support_x, query_x)
        B = support_x.shape[0]
        return (self.feature_vectors(support_x.flatten(0, 1)).view(B, support_x.shape[1], -1),
                self.feature_vectors(query_x.flatten(0, 1)).view(B, query_x.shape[1], -1))

    def predict_features(self, support_z, support_y, query_z, ways=None):
        ways = infer_ways(support_y, ways)
        # in fp32 even under bf16 autocast: ||q||^2 + ||c||^2 - 2 q.c cancels badly at bf16 precision
        with torch.autocast(support_z.device.type, enabled=False):
            protos = prototypes(support_z.float(), support_y, ways)
            return -distance(query_z.float(), protos, self.config.distance) * self.log_scale.exp()

    def loss(self, episode):
        logits = self.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        metrics = {"ce": float(loss.detach())}
        if self.config.l2_penalty:
            penalty = sum(0.5 * p.pow(2).sum() for n, p in self.named_parameters() if n != "log_scale")
            loss = loss + self.config.l2_penalty * penalty
        metrics["acc"] = float(accuracy(logits.detach(), episode.query_y).mean())
        return loss, metrics
