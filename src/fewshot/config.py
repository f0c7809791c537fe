"""Run configuration: one dataclass, defaults reproduce the prototypical-network Omniglot recipe.

A run directory stores the resolved config as ``config.yaml``; ``--config FILE.yaml`` (a recipe) sets any
field, and command-line flags override the file.

Every field is checked in one place, :func:`check_config`: its type from the dataclass annotation (an ``int``
field takes an integer, not ``"3"`` or ``3.5``; a ``float`` field any finite number) and its range from
:data:`RANGES` (numbers are non-negative unless listed there). ``RunConfig.from_dict``/``load`` and
:func:`fewshot.run.fit` call it, so recipes, flags and the Python API get the same one-line errors.
Recipes are read with YAML 1.2's number syntax, so ``lr: 1e-3`` is the number it looks like (YAML 1.1, and
so plain PyYAML, reads it as a string); a quoted ``"1e-3"`` stays a string.
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import FewshotError
from .explicit import mark_explicit, tracks_explicit
from .precision import PRECISIONS
from .train import OPTIMIZERS, SCHEDULES, TrainConfig


@tracks_explicit
@dataclass
class RunConfig:
    """A run's settings. Fields not set explicitly (in the constructor, by assignment, by a flag; a recipe
    file sets them all) take the chosen method's literature settings (its ``run_defaults``) when the run
    starts (:func:`fewshot.run.apply_run_defaults`), in the Python API as on the command line."""
    method: str = "protonet"
    options: dict = field(default_factory=dict)   #: the method's own options (its Config fields)
    data: str = "glyphs"        #: built-in name (glyphs, omniglot, cifar100, mini-imagenet) or a path
    #: CSV of path,label rows (paths relative to --data, header optional) labelling the folder's images
    labels: Optional[str] = None
    #: regular expression searched in each image name of the flat --data folder; its first group is the class
    label_pattern: Optional[str] = None
    #: image size: N, [height, width] or auto (the data's own: Omniglot and glyphs 28, CIFAR-100 32,
    #: mini-ImageNet 84, an image folder its images' median size with the longer side at most 84; channels
    #: left unset then follow the data too, RGB for colour images); resolved and recorded by the run
    size: Any = 28
    channels: Optional[int] = None   #: 1 (grey) or 3 (RGB): image folders (default 1), mini-ImageNet (default 3)
    invert: Optional[bool] = None    #: image folders: invert intensities
    #: memory-map the decoded images instead of loading them: auto (when they exceed 2 GiB, e.g. tiered-ImageNet;
    #: $FEWSHOT_MMAP_BYTES sets the bound), true or false
    mmap: Any = "auto"
    #: class split: "auto" (the data's own train/val/test split when it comes with one, as mini-ImageNet does;
    #: else fraction:0.2), "published" (that split, required), "fraction:0.2" (seeded 80-20),
    #: "group:Korean,Tagalog" (test groups; "+val:A,B" adds validation groups),
    #: "files:train.txt,test.txt[,val.txt]" (class-name lists), "cifar-fs" / "fc100"
    #: (the published CIFAR-100 train/val/test splits), "none" (no test classes: train on every class but the
    #: validation share, see val_fraction)
    split: str = "auto"
    val_fraction: float = 0.1   #: share of training classes held out for validation (when split has no val)
    split_seed: int = 0
    rotations: bool = False     #: add 90/180/270-degree rotations as new training classes
    augment: dict = field(default_factory=dict)   #: e.g. {"affine": {"degrees": 10, "translate": 0.1}}
    ways: int = 60
    shots: int = 5
    queries: int = 5
    batch: int = 1              #: tasks per training step
    same_group: float = 0.0     #: probability that a training task takes all its classes from one group
    unlabeled: int = 0          #: unlabelled examples per way in each task (semi-supervised; train and test)
    distractors: int = 0        #: distractor classes per task seen only among the unlabelled examples
    attributes: Optional[str] = None  #: CSV of class name -> semantic vector (zero-shot methods)
    #: where training tasks come from: labels (real classes), cactus (clusters of an embedding learned without
    #: labels; settings after a colon, e.g. cactus:embedding=pca,k=200) or umtra (augmentations of random
    #: images); the training images' labels are then never used (fewshot.unsupervised)
    tasks: str = "labels"
    #: DEML (learning in concept space, fewshot.concept): an external labelled data set (a --data name such as
    #: glyphs, or a path) whose classes a concept discriminator learns from the method's embedding, trained
    #: with it; methods with an embedding only; unset = off
    concept_data: Optional[str] = None
    concept_weight: float = 1.0  #: DEML: lambda, the weight of the concept discriminator's loss (0: left out)
    concept_batch: int = 64     #: DEML: external images per training step
    #: DEML: use this many of the external set's classes, a seeded random choice (0: all); a short run's
    #: discriminator learns a few hundred classes where it cannot learn thousands
    concept_classes: int = 0
    #: validation ways (default: 5, at most the validation classes and a fixed head's size)
    val_ways: Optional[int] = None
    val_shots: int = 1
    #: validation queries per class (default: 15, fewer when the smallest validation class is too small)
    val_queries: Optional[int] = None
    #: test ways (default: 5, at most a fixed head's size, e.g. maml's --outputs)
    test_ways: Optional[int] = None
    test_shots: int = 1
    #: test queries per class (default: 15, fewer when the smallest test class is too small)
    test_queries: Optional[int] = None
    test_episodes: int = 1000
    #: test-time augmentation: predict from this many extra jittered copies of every support and query
    #: image (the run's augment transform, affine jitter if none) and average; 0 = off. Used by the final
    #: test, `fewshot eval` and `fewshot predict` unless they are given --tta
    tta: int = 0
    #: test-time fine-tuning: Adam steps that adapt a copy of a metric method to each task's support set
    #: (pseudo-episodes of jittered support copies, fewshot.finetune) before it predicts; 0 = off. Used by the
    #: final test, `fewshot eval` and `fewshot predict` unless they are given --finetune-steps
    finetune_steps: int = 0
    finetune_lr: float = 1e-3   #: test-time fine-tuning: Adam learning rate (more than 0 when fine-tuning)
    #: epochs of supervised pretraining before meta-training: the method's backbone and a linear classifier
    #: over all training classes, on shuffled mini-batches of the training images (fewshot.pretrain); 0 = none
    pretrain_epochs: int = 0
    pretrain_lr: float = 1e-3   #: pretraining: Adam learning rate, cosine-annealed to 0 over the epochs
    pretrain_batch: int = 64    #: pretraining: training images per mini-batch
    device: str = "auto"
    precision: str = "auto"     #: auto | fp32 | bf16 | fp16 (autocast + gradient scaler; resolved and recorded)
    channels_last: Any = "auto"  #: auto | true | false (resolved and recorded)
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "RunConfig":
        d = dict(d or {})
        known = {f.name for f in fields(RunConfig)}
        tknown = {f.name for f in fields(TrainConfig)}
        tr = dict(d.pop("train", None) or {})
        for k in list(d):
            if k in tknown and k not in known:     # allow flat train options in recipes
                tr[k] = d.pop(k)
        bad = sorted(set(d) - known)
        if bad:
            raise FewshotError(f"unknown config key {bad[0]!r}; known: {', '.join(sorted(known | tknown))}")
        badt = sorted(set(tr) - tknown)
        if badt:
            raise FewshotError(f"unknown training option {badt[0]!r}; known: {', '.join(sorted(tknown))}")
        cfg = RunConfig(**d, train=TrainConfig(**tr))
        mark_explicit(cfg)              # a recipe (or a run's saved config) is complete as it is
        mark_explicit(cfg.train)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise :class:`FewshotError` naming the first field whose type or range is wrong (see
        :func:`check_config`); ints given for float fields become floats."""
        check_config(self)

    def save(self, path: Path) -> None:
        """Write as YAML that :meth:`load` reads back to an equal config (strings that YAML 1.2 would read
        as numbers, such as a folder named ``1e5``, are quoted)."""
        Path(path).write_text(yaml.dump(self.to_dict(), Dumper=YamlDumper, sort_keys=False))

    @staticmethod
    def load(path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise FewshotError(f"no such config file: {path}")
        d = read_yaml(path)
        if not isinstance(d, dict):
            raise FewshotError(f"{path} must hold a mapping of config keys")
        try:
            return RunConfig.from_dict(d)
        except FewshotError as e:
            raise FewshotError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------ YAML
class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax: ``1e-3``, ``5e4``, ``1.`` and ``.5`` are numbers
    (YAML 1.1 wants a dot and a signed exponent, so ``1e-3`` would be a string); ``.inf``/``.nan`` as before.
    Quoted scalars stay strings."""


#: YAML 1.2 core schema floats (the int resolver, tried first, still takes plain digits)
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
                           |[-+]?\.(?:inf|Inf|INF)
                           |\.(?:nan|NaN|NAN))$""", re.X)
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


class YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper resolving plain scalars as :class:`YamlLoader` does, so it quotes every string
    that loader would read as a number."""


YamlDumper.yaml_implicit_resolvers = YamlLoader.yaml_implicit_resolvers


def read_yaml(path: Path):
    """The YAML document in ``path`` read with :class:`YamlLoader` (``None`` when empty); a file that is not
    UTF-8 text or not YAML is a one-line error naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FewshotError(f"cannot read {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                           f"{e.start})") from None
    except OSError as e:
        raise FewshotError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        raise FewshotError(f"cannot parse {path}: {' '.join(str(e).split())}") from None


# ------------------------------------------------------------------------------------------ checks
#: Allowed ranges of numeric fields of RunConfig and TrainConfig, by name: (low, high, interval) with
#: interval "[]", "[)" or "()"-style brackets and ``high`` None for no upper bound. A number not listed here
#: must be finite and >= 0.
RANGES = {
    **{k: (1, None, "[)") for k in (
        "ways", "shots", "queries", "batch", "val_ways", "val_shots", "val_queries", "test_ways",
        "test_shots", "test_queries", "test_episodes", "episodes", "step_size", "val_episodes",
        "ckpt_every", "log_every", "pretrain_batch", "concept_batch")},
    "pretrain_lr": (0, None, "()"),
    "lr": (0, None, "()"),
    "gamma": (0, None, "()"),
    "val_fraction": (0, 1, "[)"),
    "same_group": (0, 1, "[]"),
    "momentum": (0, 1, "[)"),
}
#: Fields that take one of a few values.
CHOICES = {
    "precision": ("auto",) + PRECISIONS,
    "channels": (1, 3),
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
}
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
          list: "a list"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, what: str, value, hint: str = "") -> FewshotError:
    """The one message shape of a bad field: ``ways must be at least 1, got 0 (--ways)``."""
    return FewshotError(f"{name} must be {what}, got {value!r} ({_flag(name)}{hint})")


def _type_error(name: str, kind: str, value) -> FewshotError:
    hint = "; quoted in the YAML? remove the quotes" if isinstance(value, str) and _looks_numeric(value) else ""
    return _bad(name, kind, value, hint)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _check_value(name: str, t, value):
    """``value`` checked against annotation ``t``: returns the value to store (ints become floats for float
    fields) or raises naming ``name``. Annotations other than int/float/bool/str/dict/list/Optional pass."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        if len(inner) == 1:
            return _check_value(name, inner[0], value)
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise _type_error(name, _KINDS[bool], value)
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, _KINDS[int], value)
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, _KINDS[float], value)
        if not math.isfinite(value):
            raise _bad(name, "a finite number", value)
        return float(value)
    if t in (str, dict) or origin is dict:
        kind = str if t is str else dict
        if not isinstance(value, kind):
            raise _type_error(name, _KINDS[kind], value)
        return value
    if t is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(name, _KINDS[list], value)
        if args:
            return [_check_value(name, args[0], v) for v in value]
        return list(value)
    return value


def _check_range(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, brackets = RANGES.get(name, (0, None, "[)"))
    too_low = value < low or (brackets[0] == "(" and value == low)
    too_high = high is not None and (value > high or (brackets[1] == ")" and value == high))
    if too_low or too_high:
        if high is not None:
            what = f"in {brackets[0]}{low}, {high}{brackets[1]}"
        elif brackets[0] == "(":
            what = f"more than {low}"
        else:
            what = f"at least {low}"
        raise _bad(name, what, value)


def check_fields(obj, free=()) -> None:
    """Check (and normalise) every field of the dataclass ``obj`` against its annotation and :data:`RANGES`
    / :data:`CHOICES`; nested dataclass fields are checked the same way. Fields named in ``free`` get the
    type check only."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            check_fields(value)
            continue
        value = _check_value(f.name, hints.get(f.name, Any), value)
        if f.name not in free:
            _check_range(f.name, value)
        options = CHOICES.get(f.name)
        if options and value is not None and value not in options:
            if isinstance(value, str):
                raise FewshotError(f"unknown {f.name} {value!r} ({_flag(f.name)}); choose from "
                                   f"{', '.join(options)}")
            raise _bad(f.name, " or ".join(map(str, options)), value)
        object.__setattr__(obj, f.name, value)      # normalised, not set by the user (fewshot.explicit)


def check_size(size) -> tuple:
    """An image size (``N`` or ``[height, width]``, positive integers) as ``(h, w)``; else an error naming
    ``size``. ``"auto"`` (resolved from the data when a run starts) passes as ``None``."""
    if size == "auto":
        return None
    parts = [size] if not isinstance(size, (list, tuple)) else list(size)
    if (len(parts) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in parts)):
        raise _bad("size", "a positive integer N, [height, width] or auto", size)
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def check_config(cfg: "RunConfig") -> None:
    """Every field of ``cfg`` (and of ``cfg.train``) checked in one pass: the type its annotation says, the
    range in :data:`RANGES`, the choices in :data:`CHOICES`; then the fields whose annotation is ``Any``
    (size, channels_last), the split spec, and the method's options against its Config annotations.
    Raises :class:`FewshotError` naming the first bad field and its flag."""
    from . import methods, tasks
    # a task family sets the ways itself (0 for regression: no classes)
    check_fields(cfg, free=("ways", "val_ways", "test_ways") if tasks.is_family(cfg.data) else ())
    check_size(cfg.size)
    if not isinstance(cfg.channels_last, (bool, str)):
        raise _type_error("channels_last", "auto, true or false", cfg.channels_last)
    parse_split(cfg.split)
    if cfg.finetune_steps and cfg.finetune_lr <= 0:
        raise _bad("finetune_lr", "more than 0 when finetune_steps > 0", cfg.finetune_lr)
    from .unsupervised import parse_tasks
    parse_tasks(cfg.tasks)
    if cfg.attributes is not None and not cfg.attributes:
        raise FewshotError("attributes (--attributes) must name a CSV file")
    if cfg.concept_data is not None and not cfg.concept_data:
        raise FewshotError("concept_data (--concept-data) must name a data set or a path")
    mcls = methods.get(cfg.method)
    hints = typing.get_type_hints(mcls.Config)
    for key, value in list(cfg.options.items()):
        if key not in hints:
            known = ", ".join(sorted(f.name for f in fields(mcls.Config)))
            raise FewshotError(f"method {cfg.method!r} has no option {key!r}; options: {known}")
        cfg.options[key] = _check_value(key, hints[key], value)


def parse_split(spec: str) -> dict:
    """"auto" | "published" | "fraction:0.2" | "group:A,B[+val:C]" | "files:train.txt,test.txt[,val.txt]" |
    "cifar-fs" | "fc100" | "none" -> a dict."""
    if not isinstance(spec, str):
        raise FewshotError(f"split (--split) must be a string such as fraction:0.2, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind in ("auto", "published") and not rest:   # the split the data comes with (auto: if it has one)
        return {"kind": kind}
    if kind == "none" and not rest:    # no held-out classes: every class trains (validation: val_fraction)
        return {"kind": "none"}
    if kind == "fraction":
        try:
            f = float(rest or 0.2)
        except ValueError:
            f = float("nan")
        if not 0 < f < 1:
            raise FewshotError(f"bad split {spec!r}: fraction:F with 0 < F < 1 (or --split none to hold out "
                               "no classes)")
        return {"kind": "fraction", "test": f}
    if kind in ("90-10", "80-20", "50-50") and not rest:
        return {"kind": "fraction", "test": int(kind.split("-")[1]) / 100}
    if kind == "group":
        test, _, val = rest.partition("+val:")
        t = [g for g in test.split(",") if g]
        if not t:
            raise FewshotError(f"bad split {spec!r}: group:TEST1,TEST2[+val:VAL1]")
        return {"kind": "group", "test": t, "val": [g for g in val.split(",") if g]}
    if kind in ("cifar-fs", "fc100") and not rest:   # published CIFAR-100 splits (train, val, test)
        return {"kind": "named", "name": kind}
    if kind == "files":
        parts = [p for p in rest.split(",") if p]
        if len(parts) not in (2, 3):
            raise FewshotError(f"bad split {spec!r}: files:train.txt,test.txt[,val.txt]")
        return {"kind": "files", "train": parts[0], "test": parts[1], "val": parts[2] if len(parts) > 2 else None}
    raise FewshotError(f"unknown split {spec!r}; use auto, published, fraction:F, 90-10/80-20/50-50, group:A,B, "
                       "files:..., cifar-fs or fc100, or none")
