"""Prototypical network with data hallucination (after Wang, Girshick, Hebert & Hariharan 2018,
"Low-Shot Learning from Imaginary Data", CVPR).

A generator ("hallucinator") G maps a real support feature and a noise vector to a new feature,

    x' = G([f(x), z]),   z ~ N(0, I_D),   G: 2D -> H -> H -> D (ReLU and dropout after each hidden layer,
                                           H = 2400 by default),

and M extra features per class are generated, each seeded by a support example of that class chosen at
random (for K = 1 every hallucination grows from the single real example). The class prototype averages the
K real and M hallucinated features,

    c_k = (sum_{i: y_i = k} f(x_i) + sum_{m=1}^{M} G([f(x_{k,j_m}), z_m])) / (K + M),

and p(y = k | x) = softmax_k(-d(f(x), c_k)) as in a prototypical network (squared Euclidean by default).
G and the embedding f are trained end to end with the query classification loss only, so G learns to
produce features that help classification rather than realistic ones (the paper's meta-learned
hallucination). With M = 0 the method is exactly a prototypical network.

Evaluation draws its noise (and its seed choices) from a generator reset to ``eval_seed`` at every call, so
the same episode always gets the same prediction (within the same batch of tasks: the noise of a call is
drawn for all its tasks at once). Prediction goes through :meth:`HallucinationProtoNet.predict_features`, so
evaluation may score it from cached per-image features, in the same calls, with the same noise.
``gen_init=identity`` starts G as the identity map of the seed feature plus a noise-driven perturbation (the
first 2D hidden units carry +f and -f, the output sums them back); this keeps early hallucinations near their
seeds. ``auto`` uses it when H >= 2D.

Reference (mini-ImageNet 5-way, prototypical network with hallucination): M = 10: 44.1 +- 1.1,
M = 50: 44.26 +- 0.62, M = 100: 47.59 +- 0.79 (%).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from . import register
from .base import FeatureMethod, accuracy, infer_ways
from .protonet import distance, DISTANCES, encoder, EncoderOptions, prototypes

GEN_INITS = ("auto", "identity", "random")


class Hallucinator(nn.Module):
    """G([feature, noise]) -> feature: Linear(2D, H), ReLU, dropout, Linear(H, H), ReLU, dropout, Linear(H, D)."""

    def __init__(self, dim: int, hidden: int = 2400, dropout: float = 0.5, init: str = "auto"):
        super().__init__()
        if init not in GEN_INITS:
            raise FewshotError(f"unknown gen_init {init!r}; choose from {', '.join(GEN_INITS)}")
        if hidden < 1:
            raise FewshotError(f"gen_hidden must be at least 1, got {hidden}")
        if not 0 <= dropout < 1:
            raise FewshotError(f"dropout must be in [0, 1), got {dropout}")
        if init == "identity" and hidden < 2 * dim:
            raise FewshotError(f"gen_init identity needs gen_hidden >= 2 x the feature size ({2 * dim}), got {hidden}")
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        if init == "identity" or (init == "auto" and hidden >= 2 * dim):
            self._identity_init()

    @torch.no_grad()
    def _identity_init(self) -> None:
        D = self.dim
        l1, l2, l3 = self.net[0], self.net[3], self.net[6]
        eye = torch.eye(D)
        # hidden units 0..D-1 carry relu(f), units D..2D-1 carry relu(-f); both layers pass them on unchanged
        l1.weight[:2 * D].zero_()
        l1.weight[:D, :D] = eye
        l1.weight[D:2 * D, :D] = -eye
        l1.bias[:2 * D].zero_()
        l2.weight[:2 * D].zero_()
        l2.weight[:2 * D, :2 * D] = torch.eye(2 * D)
        l2.bias[:2 * D].zero_()
        # output = relu(f) - relu(-f) (= f) + a perturbation from the other, randomly initialised, units
        l3.weight[:, :2 * D] = torch.cat([eye, -eye], 1)
        l3.bias.zero_()

    def forward(self, seed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([seed, noise], -1))


@torch.no_grad()
def feature_dim(backbone: nn.Module, in_shape) -> int:
    """Size of the (flattened) features ``backbone`` gives for one input of shape ``in_shape``."""
    training = backbone.training
    backbone.eval()
    d = backbone(torch.zeros(1, *in_shape)).shape[1:].numel()
    backbone.train(training)
    return int(d)


def hallucination_seeds(y: torch.Tensor, ways: int, m: int, generator=None) -> torch.Tensor:
    """Indices into the support ``[B, ways * m]``: for each class, ``m`` of its support examples drawn
    uniformly with replacement (labels ``y`` ``[B, S]``). Row block ``k*m .. k*m+m-1`` belongs to class k."""
    B, S = y.shape
    mask = F.one_hot(y, ways).transpose(1, 2).reshape(B * ways, S).float()   # [B*N, S]
    if bool((mask.sum(-1) == 0).any()):
        raise FewshotError("every class of a task needs at least one support example")
    idx = torch.multinomial(mask, m, replacement=True, generator=generator)  # [B*N, m]
    return idx.view(B, ways * m)


@register("hallucinate")
class HallucinationProtoNet(FeatureMethod):
    """Prototypical network whose prototypes also average M generated features per class (Wang et al. 2018)."""

    @dataclass
    class Config(EncoderOptions):
        distance: str = "sqeuclidean"   #: sqeuclidean | euclidean | cosine | dot
        m: int = 10                     #: hallucinated features per class (0: a plain prototypical network)
        gen_hidden: int = 2400          #: hidden width of the generator
        dropout: float = 0.5            #: generator dropout
        gen_init: str = "auto"          #: auto | identity | random
        noise_std: float = 1.0          #: standard deviation of the generator's noise input
        eval_seed: int = 0              #: seed of the noise at evaluation (deterministic predictions)

    def __init__(self, config: "HallucinationProtoNet.Config", in_shape):
        super().__init__(config, in_shape)
        if config.distance not in DISTANCES:
            raise FewshotError(f"unknown distance {config.distance!r}; choose from {', '.join(DISTANCES)}")
        if config.m < 0:
            raise FewshotError(f"m (hallucinated features per class) must be at least 0, got {config.m}")
        self.backbone = encoder(self)
        dim = feature_dim(self.backbone, self.in_shape)
        self.generator = Hallucinator(dim, config.gen_hidden, config.dropout, config.gen_init)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _rng(self, device):
        """None while training (global RNG); a generator reset to ``eval_seed`` in evaluation mode."""
        if self.training:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(int(self.config.eval_seed))
        return g

    def hallucinate(self, zs: torch.Tensor, ys: torch.Tensor, ways: int, m: int | None = None,
                    rng=None) -> tuple:
        """``m`` generated features per class from support features ``[B, S, D]`` -> ``(features
        [B, ways*m, D], labels [B, ways*m])``, class by class."""
        m = self.config.m if m is None else int(m)
        B, _, D = zs.shape
        if m == 0:
            return zs.new_zeros(B, 0, D), ys.new_zeros(B, 0)
        idx = hallucination_seeds(ys, ways, m, rng)                                   # [B, N*m]
        seeds = zs.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))
        noise = torch.randn(seeds.shape, generator=rng, device=zs.device, dtype=torch.float32)
        fake = self.generator(seeds, (noise * self.config.noise_std).to(seeds.dtype))
        labels = torch.arange(ways, device=ys.device).repeat_interleave(m).expand(B, -1)
        return fake, labels

    def predict_features(self, support_z, support_y, query_z, ways=None):
        """Logits from support and query features; in evaluation mode the noise (and the seed choices) come
        from a generator reset to ``eval_seed`` at each call, so they depend on the call's tasks only."""
        ways = infer_ways(support_y, ways)
        fake, fy = self.hallucinate(support_z, support_y, ways, rng=self._rng(support_z.device))
        with torch.autocast(support_z.device.type, enabled=False):
            protos = prototypes(torch.cat([support_z.float(), fake.float()], 1), torch.cat([support_y, fy], 1),
                                ways)
            return -distance(query_z.float(), protos, self.config.distance)

    def loss(self, episode):
        logits = self.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        return loss, {"ce": float(loss.detach()), "acc": float(accuracy(logits.detach(), episode.query_y).mean())}

    # ---- plots
    @torch.no_grad()
    def extra_plots(self, run, dataset, out_dir) -> list:
        """t-SNE of real and hallucinated features of a few held-out classes (``tsne_hallucinated.png``):
        up to 5 classes, 20 real images each, M features per class grown from the first K (the run's shots)
        images with the evaluation noise (M = 10 when the run uses m = 0)."""
        from ..data.images import to_float
        from ..figures import tsne_real_vs_hallucinated
        g = torch.Generator().manual_seed(0)
        n = min(5, len(dataset))
        classes = torch.randperm(len(dataset), generator=g)[:n].tolist()
        shots = max(1, int(getattr(run.config, "shots", 1) or 1))
        m = self.config.m or 10
        was = self.training
        self.eval()
        try:
            real, real_y, seeds_x, seeds_y = [], [], [], []
            for i, c in enumerate(classes):
                imgs = to_float(dataset.images(c)[:20]).to(run.device)
                real.append(self.backbone(imgs).float().flatten(1))
                real_y += [i] * len(imgs)
                seeds_x.append(imgs[:min(shots, len(imgs))])
                seeds_y += [i] * min(shots, len(imgs))
            zs = self.backbone(torch.cat(seeds_x)).float().flatten(1).unsqueeze(0)
            ys = torch.tensor(seeds_y, device=zs.device).unsqueeze(0)
            fake, fy = self.hallucinate(zs, ys, n, m=m, rng=self._rng(zs.device))
        finally:
            self.train(was)
        out = Path(out_dir) / "tsne_hallucinated.png"
        return [tsne_real_vs_hallucinated(torch.cat(real).cpu(), torch.tensor(real_y), fake[0].float().cpu(),
                                          fy[0].cpu(), [dataset.names[c] for c in classes], out,
                                          title=f"{run.path.name}: real vs hallucinated features "
                                                f"({m} per class from {shots} real)")]
