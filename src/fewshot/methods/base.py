"""The contract every method follows.

A method is an ``nn.Module`` with

- ``loss(episode) -> (loss, metrics)``: the training objective on a batch of tasks (metrics: floats),
- ``predict(support_x, support_y, query_x, ways) -> logits`` ``[B, N*Q, ways]`` for inference,

and a dataclass ``Config`` of its options (defaults reproduce the literature recipe). Every optional hook
the trainer, the evaluator, the CLI and the plots call is declared on :class:`Method` below with its
default, so none of them probes a method for attributes or asks which method it holds.

Networks: a method builds the network its ``backbone`` option names through one place,
:meth:`Method.make_backbone` (names, ``package.module:factory``, ``file.py:factory``, ``timm:NAME``, or an
``nn.Module`` / callable given to :func:`fewshot.methods.build`), which also loads ``pretrained`` weights
and applies ``freeze`` (:class:`BackboneOptions`).
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import nn

from ..episodes import Episode
from ..errors import FewshotError

#: the ``backbone`` value a config records for a module instance given in Python: it names the class, and a
#: run trained with it is reloaded with ``load_run(path, backbone=<a module of that class>)``
INSTANCE_PREFIX = "instance of "


@dataclass
class BackboneOptions:
    """The network options of every method that has an encoder (their Configs extend this)."""
    #: network: a name (auto, conv4, resnet12, resnet18, resnet20, wrn28-10, mlp, conv1d, ...),
    #: package.module:factory, path/to/file.py:factory or timm:NAME
    backbone: str = "auto"
    pretrained: str = ""            #: local .pt/.pth/.safetensors state_dict loaded into the backbone ("" none)
    pretrained_strict: bool = True  #: missing or unexpected keys in the pretrained file are an error
    freeze: str = "none"            #: none | all (all but the head: a linear probe) | STAGE (it and those before)


@dataclass
class DataInfo:
    """What a run's data tells a method before it is built (:meth:`Method.configure`): the number of
    outputs a fixed-size head needs (the ways, or a task family's target size; 0 when unknown) and the
    length of the classes' semantic vectors (0 when the data has none)."""
    outputs: int = 0
    attr_dim: int = 0


@dataclass
class _Build:
    """Build-time arguments that cannot live in a config (see :func:`building`)."""
    backbone: Any = None            #: an nn.Module or callable given in Python (None: the config's spec)
    weights: bool = True            #: load the config's pretrained file (not when a checkpoint follows)


_BUILD: contextvars.ContextVar = contextvars.ContextVar("fewshot_method_build", default=_Build())


@contextlib.contextmanager
def building(backbone: Any = None, weights: bool = True):
    """Within this block, a :class:`Method` being constructed takes ``backbone`` (a module or callable)
    instead of its config's spec, and skips its pretrained file unless ``weights``. Used by
    :func:`fewshot.methods.build`; construct methods through that."""
    token = _BUILD.set(_Build(backbone, weights))
    try:
        yield
    finally:
        _BUILD.reset(token)


def spec_label(spec: Any) -> str:
    """What a config records for a backbone given in Python: ``package.module:qualname`` for an importable
    callable (rebuilt from it on load), ``instance of package.module.Class`` for a module."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, nn.Module):
        return f"{INSTANCE_PREFIX}{type(spec).__module__}.{type(spec).__qualname__}"
    mod, qual = getattr(spec, "__module__", None), getattr(spec, "__qualname__", "")
    if mod and qual and "<" not in qual:
        return f"{mod}:{qual}"
    return f"{INSTANCE_PREFIX}{type(spec).__module__}.{type(spec).__qualname__}"


class Method(nn.Module, metaclass=abc.ABCMeta):
    name: ClassVar[str] = ""
    Config: ClassVar[type]
    #: run settings the literature uses with this method (RunConfig fields; "train" holds TrainConfig
    #: fields); ``fewshot train METHOD`` starts from them when no --config recipe is given
    run_defaults: ClassVar[dict] = {}

    def __init__(self, config, in_shape: Sequence[int]):
        super().__init__()
        self.config = config
        self.in_shape = tuple(int(s) for s in in_shape)
        self._build = _BUILD.get()
        # (module, head name) that make_backbone built; kept out of the module tree (it is a submodule already)
        self.__dict__["_backbone_built"] = None

    # ---- what the data tells a method before it is built
    @classmethod
    def configure(cls, options: dict, data: DataInfo) -> dict:
        """The method's options completed from the data (a new dict; ``options`` is left as it is): what a
        run knows only once the data is loaded. The default fills ``outputs`` (a fixed-size head) with
        ``data.outputs`` and ``attr_dim`` (semantic class vectors) with ``data.attr_dim`` when the Config has
        such a field left unset (0); methods needing more override this."""
        names = {f.name for f in fields(cls.Config)}
        out = dict(options)
        if "outputs" in names and not out.get("outputs") and data.outputs:
            out["outputs"] = int(data.outputs)
        if "attr_dim" in names and not out.get("attr_dim") and data.attr_dim:
            out["attr_dim"] = int(data.attr_dim)
        return out

    @classmethod
    def head_size(cls, options: dict) -> Optional[int]:
        """The most ways this method can label in a task, when it has a fixed-size classification head
        (the ``outputs`` option of the MAML family); ``None`` when it adapts to any number of ways."""
        names = {f.name for f in fields(cls.Config)}
        return int(options["outputs"]) if "outputs" in names and options.get("outputs") else None

    # ---- the network
    def make_backbone(self, outputs: Optional[int] = None, own: Optional[Callable[[str], Any]] = None,
                      head: Optional[str] = None, **options) -> nn.Module:
        """The network the ``backbone`` option names (or the module/callable given to
        :func:`fewshot.methods.build`), the one place every method builds its network.

        ``outputs``: a whole network with a head of that size (gradient-based methods); ``None``: an
        encoder whose output is the embedding (metric methods). ``own``: the method's builder for names it
        builds itself (``own(name)`` returns a module, or ``None`` for names it leaves to
        :func:`fewshot.models.backbones.build_backbone`). ``options`` go to registered networks and
        factories. Then the config's ``pretrained`` file is loaded (``pretrained_strict``) and ``freeze``
        applied; ``head`` names the classifier head they leave out (default: the declared one)."""
        from ..models.backbones import build_backbone, find_head, freeze
        from ..models.weights import load_weights
        c = self.config
        given = self._build.backbone
        spec = given if given is not None else getattr(c, "backbone", "auto")
        if isinstance(spec, str) and spec.startswith(INSTANCE_PREFIX):
            raise FewshotError(f"backbone {spec[len(INSTANCE_PREFIX):]}: this model was built from a module "
                               f"given in Python; pass one of that class again (fewshot.load_run(path, "
                               f"backbone=module) or fewshot.methods.build(..., backbone=module))")
        net = own(spec) if own is not None and isinstance(spec, str) else None
        if net is None:
            net = build_backbone(spec, self.in_shape, outputs, **options)
        if given is not None and hasattr(c, "backbone"):
            c.backbone = spec_label(given)
        path = getattr(c, "pretrained", "")
        if path and self._build.weights:
            load_weights(net, path, strict=getattr(c, "pretrained_strict", True),
                         head=head if head is not None else "auto")
        what = getattr(c, "freeze", "none")
        if what and what != "none":
            # a whole network keeps its classifier head trainable (the declared one, else its last nn.Linear)
            freeze(net, what, head if head is not None or outputs is None else find_head(net))
        self.__dict__["_backbone_built"] = (net, head if head is not None or outputs is None else find_head(net))
        return net

    def _built(self) -> Optional[tuple]:
        """``(module, head)`` recorded by :meth:`make_backbone` on this method or a method it holds."""
        for m in self.modules():
            built = m.__dict__.get("_backbone_built") if isinstance(m, Method) else None
            if built is not None:
                return built
        return None

    @property
    def backbone_attr(self) -> Optional[str]:
        """The dotted name (for ``get_submodule``) of the network :meth:`make_backbone` built: what
        pretrained weights, freezing and the pretraining stage (:mod:`fewshot.pretrain`) act on; ``None``
        for a method that built none."""
        built = self._built()
        if built is None:
            return None
        return next((n for n, m in self.named_modules() if m is built[0] and n), None)

    @property
    def backbone_head(self) -> Optional[str]:
        """The name, inside the :attr:`backbone_attr` module, of its classifier head when that module is a
        whole network with a head (the gradient-based family: the declared head, else its last
        ``nn.Linear``); ``None`` for an encoder, whose output is the embedding."""
        built = self._built()
        return built[1] if built is not None else None

    @property
    def rebuildable(self) -> bool:
        """Whether ``methods.build(self.name, self.in_shape, **self.config_dict())`` makes this model again
        (not for a module instance given in Python: worker processes then cannot copy the method)."""
        return not str(getattr(self.config, "backbone", "")).startswith(INSTANCE_PREFIX)

    # ---- the contract
    @abc.abstractmethod
    def loss(self, episode: Episode) -> tuple:
        """Training objective on a batch of tasks: ``(scalar loss, {name: float})``."""

    @abc.abstractmethod
    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                ways: int | None = None) -> torch.Tensor:
        """Logits ``[B, M, ways]`` for queries ``[B, M, ...]`` given a labelled support ``[B, S, ...]``."""

    # ---- optional
    def predict_episode(self, episode: Episode) -> torch.Tensor:
        """Logits for the queries of an :class:`Episode` (what evaluation calls). Methods that use more
        of the episode than the labelled support (unlabelled examples, class attributes) override it."""
        return self.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)

    # ---- prediction from per-image features (evaluation from cached embeddings)
    def feature_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[M, D]`` of inputs ``[M, ...]``, each computed on its own (batch norm in evaluation
        mode): what :meth:`predict_features` consumes. The default flattens :meth:`embed`."""
        return self.embed(x).flatten(1)

    def embed_tasks(self, support_x: torch.Tensor, query_x: torch.Tensor) -> tuple:
        """:meth:`feature_vectors` of a batch of tasks' support ``[B, S, ...]`` and queries ``[B, Q, ...]`` in
        one pass -> ``(support features [B, S, D], query features [B, Q, D])``."""
        B, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        z = self.feature_vectors(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
        return z[:B * S].view(B, S, -1), z[B * S:].view(B, Q, -1)

    def predict_features(self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor,
                         ways: int | None = None) -> torch.Tensor:
        """Logits ``[B, M, ways]`` from support features ``[B, S, D]`` (labels ``[B, S]``) and query features
        ``[B, M, D]`` (rows of :meth:`feature_vectors`). A method whose ``predict`` is exactly
        ``predict_features(*embed_tasks(support_x, query_x), support_y, ...)`` implements it and derives
        from :class:`FeatureMethod`, whose ``predict`` is that (so the two cannot drift); the default refuses."""
        raise FewshotError(f"method {self.name} does not predict from per-image features")

    @property
    def scores_features(self) -> bool:
        """Whether predictions come from per-image features through :meth:`predict_features`, so evaluation
        may embed every image once and score episodes from the cached features (:func:`fewshot.evaluate`).
        True when the class implements ``predict_features`` and neither ``predict`` nor ``predict_episode``
        is overridden below the class that implements it (a subclass predicting otherwise, e.g. from
        unlabelled examples, is not taken for one) or replaced on this instance."""
        mro = type(self).__mro__

        def owner(name: str) -> int:         # the MRO position of the class defining ``name``
            return next(i for i, c in enumerate(mro) if name in vars(c))

        feats = owner("predict_features")
        if mro[feats] is Method or any(n in vars(self) for n in ("predict", "predict_episode")):
            return False
        return owner("predict") >= feats and owner("predict_episode") >= feats

    #: how queries are classified, for evaluation reports: "inductive" (each query on its own) or
    #: "transductive" (a task's queries share batch statistics); gradient-based methods decide per config
    inference_mode: str = "inductive"

    #: whether the training loss may go through ``torch.compile`` (``--compile``): a step without
    #: differentiation inside it (the gradient-based family's inner loop) and without data-dependent
    #: Python control flow; methods that qualify say so
    compilable: ClassVar[bool] = False

    def post_train(self, train_dataset, seed: int = 0) -> Optional[dict]:
        """Called by :func:`fewshot.fit` on each saved checkpoint after training, with the training classes;
        returns a report stored in the checkpoint (the Siamese network calibrates its same/different
        threshold), or ``None`` when there is nothing to do (the default: the checkpoint is left as it is)."""
        return None

    def pair_metrics(self, dataset, pairs: int = 1000, seed: int = 0) -> Optional[dict]:
        """Verification metrics on ``dataset`` (binary same/different and triplet accuracy, with CIs) for
        methods that score pairs; ``None`` (the default) for methods that do not."""
        return None

    def outer_optimizer(self, params: list) -> Optional[torch.optim.Optimizer]:
        """The optimiser over ``params`` (the trainable parameters) for a method that computes its whole
        training step itself and returns minus that step as its loss's gradient (MAML-RL's trust-region
        outer step: plain SGD at rate 1); ``None`` (the default): the run's ``--optimizer`` and ``--lr``."""
        return None

    #: whether the method adapts by gradient steps: :meth:`adapt_predict` and :meth:`adapted_params` work
    #: (sine and navigation plots, meta-RL evaluation)
    adapts_by_gradient: ClassVar[bool] = False

    def adapt_predict(self, params: dict, support_x, support_y, query_x, steps: Optional[int] = None):
        """One task's query outputs after ``steps`` inner steps (gradient-based methods)."""
        raise FewshotError(f"method {self.name} does not adapt by gradient steps")

    def adapted_params(self, params: dict, x, y, kind: Optional[str] = None) -> dict:
        """One task's parameters after ``x.shape[0]`` inner steps (gradient-based methods; meta-RL)."""
        raise FewshotError(f"method {self.name} does not adapt by gradient steps")

    #: whether the method labels sequences (:meth:`sequence_logits`; the copy task's figure)
    labels_sequences: ClassVar[bool] = False

    def sequence_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step output logits for input sequences (sequence models such as the NTM)."""
        raise FewshotError(f"method {self.name} does not label sequences")

    def extra_plots(self, run, dataset, out_dir) -> list:
        """Method-specific figures for ``fewshot plot`` (paths written); none by default."""
        return []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of images ``[M, C, H, W]`` (for plots, and the concept discriminator of
        :mod:`fewshot.concept`, which trains through them); methods without an embedding may skip it."""
        raise FewshotError(f"method {self.name} has no embedding to plot")

    @property
    def has_embedding(self) -> bool:
        """Whether :meth:`embed` gives features of the method's inputs, differentiable with respect to its
        weights: ``True`` for every method that defines ``embed``. ``--concept-data`` (:mod:`fewshot.concept`)
        applies to these methods only."""
        return type(self).embed is not Method.embed

    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def option_fields(cls):
        return fields(cls.Config)


class FeatureMethod(Method):
    """A method that classifies queries from per-image features: ``predict`` embeds the support and the
    queries (:meth:`Method.embed_tasks`) and scores them with the subclass's :meth:`Method.predict_features`,
    so evaluation from cached features (:attr:`Method.scores_features`) gives what ``predict`` gives."""

    def predict(self, support_x, support_y, query_x, ways=None):
        zs, zq = self.embed_tasks(support_x, query_x)
        return self.predict_features(zs, support_y, zq, ways)


def add_log_scale(module: nn.Module, scale: float, learn: bool) -> None:
    """Give ``module`` its logit temperature as ``log_scale`` (``log(scale)``): a parameter when it is
    learned, a buffer otherwise (saved either way). The metric methods multiply logits by its ``exp()``."""
    s = torch.tensor(float(scale)).log()
    if learn:
        module.log_scale = nn.Parameter(s)
    else:
        module.register_buffer("log_scale", s)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean accuracy per task: logits ``[B, M, N]``, labels ``[B, M]`` -> ``[B]``."""
    return (logits.argmax(-1) == y).float().mean(-1)


def infer_ways(support_y: torch.Tensor, ways: int | None) -> int:
    return int(ways) if ways is not None else int(support_y.max()) + 1
