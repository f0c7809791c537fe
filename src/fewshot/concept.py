"""Learning to learn in concept space: DEML (Zhou, Wu & Li 2018, "deep meta-learning").

Three parts, updated jointly by one optimiser on ``L = L_meta + lambda * L_D``:

- the **concept generator** G: the network whose features the method's :meth:`~fewshot.methods.base.Method.embed`
  returns (a metric method's encoder; for the gradient-based family, the body of the meta-parameters
  network, i.e. everything before its head);
- the **meta-learner**, the method itself working on G's output, with its own loss ``L_meta`` (prototypes,
  an inner loop, ...); nothing of it changes;
- the **concept discriminator** D: a linear classifier over the classes of an *external labelled* data set
  (``--concept-data``, e.g. the built-in ``glyphs`` for Omniglot; ``--concept-classes N``: a seeded random N of
  its classes), applied to G's flattened features of a
  mini-batch of ``--concept-batch`` external images; ``L_D`` is its cross-entropy and its gradient reaches G
  (weighted by ``lambda``, ``--concept-weight``) as well as D.

For the gradient-based family (MAML, Meta-SGD, Reptile, ...) G is the meta-parameters network before its head:
``L_D`` is computed with the meta-parameters themselves (not with task-adapted weights), so its gradient
joins the outer update of those parameters while the inner loop adapts exactly as it does without D. (With
Reptile's default outer SGD at learning rate 1, lambda scales that step directly: keep it small.)

:class:`ConceptSpace` wraps any method that has an embedding (:attr:`Method.has_embedding`). Training sees the
wrapper; everything else -- prediction, evaluation, plots, hooks -- is the wrapped method's own, reached
through the wrapper by attribute delegation. The checkpoint's ``model`` holds the wrapped method's state under
its own keys plus D's weights and the external sampler's state (its generator: where in its random stream
the next mini-batch comes from) under ``concept.``; the optimiser's state covers D too, so ``--resume``
continues bit-exactly. :func:`fewshot.run.load_run` keeps only the method's keys (:func:`method_state`): a
trained run is evaluated, and predicts, without the external data.

``lambda = 0`` leaves D out of the step entirely: the run trains exactly as the method alone (same weights,
tested), which makes it the control of a lambda sweep.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data.images import to_float
from .errors import FewshotError

#: the prefix of the discriminator's and the sampler's entries in a run's checkpoint ``model`` state
PREFIX = "concept."
#: the external sampler's generator and D's initial weights are seeded with the run's seed plus this offset
#: (so they draw nothing from, and change nothing in, the global RNG the method trains with)
SEED_OFFSET = 7_000_003


def method_state(state: dict) -> dict:
    """The wrapped method's own entries of a :class:`ConceptSpace` state dict (what a reloaded run needs)."""
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}


class ConceptDiscriminator(nn.Module):
    """D and its data: a linear classifier from G's features to the external classes, and a seeded sampler
    of external mini-batches. The sampler's position (its generator's state and the number of batches drawn)
    is the module's extra state, so it is saved and restored with D's weights."""

    def __init__(self, features: int, images, labels: torch.Tensor, classes: int, batch: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):         # D's initial weights come from the run's seed alone
            torch.manual_seed(seed)
            self.classifier = nn.Linear(features, classes)
        self.images, self.labels, self.batch = images, labels, int(batch)
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def draw(self, device) -> tuple:
        """The next external mini-batch: ``batch`` images drawn uniformly (with replacement) from the whole
        set, as floats in [0, 1] on ``device``, and their class indices."""
        index = torch.randint(len(self.labels), (self.batch,), generator=self.generator)
        self.drawn += 1
        return to_float(self.images.take(index)).to(device), self.labels[index].to(device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features.flatten(1))

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.drawn = int(state["drawn"])


def _flat_keys(module: "ConceptSpace", state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the wrapped method's entries lose the ``inner.`` level (they read as the method's
    own), D's keep ``concept.``; the order stays the module order."""
    inner = prefix + "inner."
    items = [(k, state.pop(k)) for k in list(state) if k.startswith(prefix)]
    for k, v in items:
        state[prefix + k[len(inner):] if k.startswith(inner) else k] = v


def _nest_keys(module: "ConceptSpace", state: dict, prefix: str, *args) -> None:
    """Load pre-hook, the inverse of :func:`_flat_keys`: every entry not under ``concept.`` is the method's."""
    for k in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + PREFIX)]:
        state[prefix + "inner." + k[len(prefix):]] = state.pop(k)


class ConceptSpace(nn.Module):
    """A method trained in concept space: its loss plus ``weight`` times D's cross-entropy on G's features of
    an external mini-batch (see the module docstring). Any attribute the wrapper does not define itself
    (``predict``, ``predict_episode``, ``embed``, ``config``, ``name``, every declared hook) is the wrapped
    method's."""

    def __init__(self, inner: nn.Module, images, labels: torch.Tensor, classes: int, weight: float,
                 batch: int, seed: int):
        super().__init__()
        clash = [k for k in inner.state_dict() if k.startswith(PREFIX)]
        if clash:
            raise FewshotError(f"method {inner.name} has a state entry {clash[0]!r} that --concept-data's "
                               f"discriminator would shadow")
        self.inner = inner
        self.weight = float(weight)
        self.concept = ConceptDiscriminator(feature_size(inner), images, labels, classes, batch, seed)
        self.register_state_dict_post_hook(_flat_keys)
        self.register_load_state_dict_pre_hook(_nest_keys)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)        # parameters, buffers, submodules
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    @property
    def backbone_attr(self):
        """The method's network (:attr:`Method.backbone_attr`) named from the wrapper, for ``get_submodule``."""
        name = self.inner.backbone_attr
        return None if name is None else "inner." + name

    def loss(self, episode) -> tuple:
        """``L_meta + weight * L_D``; metrics: the method's, plus ``concept_ce`` and ``concept_acc`` (D on the
        step's external mini-batch) when ``weight > 0``."""
        loss, metrics = self.inner.loss(episode)
        if self.weight == 0:
            return loss, metrics
        x, y = self.concept.draw(self.concept.classifier.weight.device)
        logits = self.concept(self.inner.embed(x)).float()
        ce = F.cross_entropy(logits, y)
        metrics = {**metrics, "concept_ce": float(ce.detach()),
                   "concept_acc": float((logits.detach().argmax(-1) == y).float().mean())}
        return loss + self.weight * ce, metrics


def feature_size(method: nn.Module) -> int:
    """The length of ``method.embed``'s flattened features, from two blank inputs in evaluation mode
    (nothing stateful runs: no gradient, no batch-norm statistics updated)."""
    was = method.training
    method.eval()
    try:
        with torch.no_grad():
            z = method.embed(torch.zeros(2, *method.in_shape))
    finally:
        method.train(was)
    return int(z[0].numel())


def load_external(spec: str, size, channels: Optional[int], in_shape: tuple, classes: int = 0, seed: int = 0):
    """The external labelled set ``spec`` (a ``--data`` name or path) at the run's image size and channels,
    checked against the method's input shape and for at least two classes; ``classes`` > 0 keeps that many of
    them, chosen at random by ``seed`` (in their original order)."""
    from . import data as fsdata
    try:
        ds = fsdata.load(spec, size=size, channels=channels)
    except FewshotError as e:
        raise FewshotError(f"--concept-data {spec}: {e}") from None
    if tuple(ds.image_shape) != tuple(in_shape):
        raise FewshotError(f"--concept-data {spec} has inputs of shape {tuple(ds.image_shape)}, but the run's data "
                           f"has {tuple(in_shape)}; the concept discriminator needs the same kind of images")
    if len(ds) < 2:
        raise FewshotError(f"--concept-data {spec} has {len(ds)} class; the concept discriminator needs at least 2")
    if classes:
        if not 2 <= classes <= len(ds):
            raise FewshotError(f"--concept-classes {classes}: --concept-data {spec} has {len(ds)} classes; choose "
                               f"2 to {len(ds)} (0: all)")
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:classes]
        ds = ds.subset(sorted(int(c) for c in pick))
    return ds


def with_concept(method: nn.Module, cfg) -> nn.Module:
    """``method`` wrapped by :class:`ConceptSpace` as ``cfg`` (a :class:`~fewshot.config.RunConfig`) asks with
    ``concept_data``, ``concept_weight``, ``concept_batch`` and ``concept_classes``; ``method`` itself when
    ``concept_data`` is unset."""
    if cfg.concept_data is None:
        return method
    if not method.has_embedding:
        raise FewshotError(f"--concept-data needs a method with an embedding of its inputs; {method.name} has none "
                           f"(use e.g. protonet, matching, maml, metasgd or reptile)")
    seed = cfg.seed + SEED_OFFSET
    ds = load_external(cfg.concept_data, cfg.size, cfg.channels, method.in_shape, cfg.concept_classes, seed)
    return ConceptSpace(method, ds, ds.labels(), len(ds), cfg.concept_weight, cfg.concept_batch, seed)
