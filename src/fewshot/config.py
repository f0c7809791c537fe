"""Run configuration: one dataclass, defaults reproduce the prototypical-network Omniglot recipe.

A run directory stores the resolved config as ``config.yaml``; ``--config FILE.yaml`` (a recipe) sets any
field, and command-line flags override the file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import FewshotError
from .train import TrainConfig


@dataclass
class RunConfig:
    method: str = "protonet"
    options: dict = field(default_factory=dict)   #: the method's own options (its Config fields)
    data: str = "glyphs"        #: built-in name (glyphs, omniglot) or a path
    size: Any = 28              #: image size (int or [h, w])
    channels: Optional[int] = None   #: image folders: 1 (grey) or 3 (RGB)
    invert: Optional[bool] = None    #: image folders: invert intensities
    #: class split: "fraction:0.2" (seeded 80-20), "group:Korean,Tagalog" (test groups; "+val:A,B" adds
    #: validation groups), "files:train.txt,test.txt[,val.txt]" (class-name lists), "cifar-fs" / "fc100"
    #: (the published CIFAR-100 train/val/test splits)
    split: str = "fraction:0.2"
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
    val_ways: int = 5
    val_shots: int = 1
    val_queries: int = 15
    test_ways: int = 5
    test_shots: int = 1
    test_queries: int = 15
    test_episodes: int = 1000
    #: test-time augmentation: predict from this many extra jittered copies of every support and query
    #: image (the run's augment transform, affine jitter if none) and average; 0 = off. Used by the final
    #: test, `fewshot eval` and `fewshot predict` unless they are given --tta
    tta: int = 0
    device: str = "auto"
    precision: str = "auto"     #: auto | fp32 | bf16 (resolved and recorded)
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
        return RunConfig(**d, train=TrainConfig(**tr))

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @staticmethod
    def load(path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise FewshotError(f"no such config file: {path}")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FewshotError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise FewshotError(f"{path} must hold a mapping of config keys")
        return RunConfig.from_dict(d)


def parse_split(spec: str) -> dict:
    """"fraction:0.2" | "group:A,B[+val:C]" | "files:train.txt,test.txt[,val.txt]" | "cifar-fs" | "fc100"
    -> a dict."""
    kind, _, rest = spec.partition(":")
    if kind == "fraction":
        try:
            return {"kind": "fraction", "test": float(rest or 0.2)}
        except ValueError:
            raise FewshotError(f"bad split {spec!r}: fraction:F with 0 < F < 1") from None
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
    raise FewshotError(f"unknown split {spec!r}; use fraction:F, 90-10/80-20/50-50, group:A,B, files:..., "
                       "cifar-fs or fc100")
