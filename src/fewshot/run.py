"""High-level runs: ``fit`` a configured method into a run directory, then ``evaluate_run``,
``predict_run`` and ``lake_eval`` from that directory. The CLI is a thin layer over these.

A run directory holds ``config.yaml`` (resolved), ``classes_{train,val,test}.txt``,
``checkpoints/{best,last}.pt``, ``metrics.{csv,jsonl}``, ``eval/*.json|csv`` and ``plots/*.png``.
"""
from __future__ import annotations

import contextlib
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import checkpoint, concept, data as fsdata, distributed, methods, pretrain, rundir, tasks, unsupervised
from .augment import build_transform
from .config import RunConfig, parse_split
from .data.dataset import ClassDataset
from .data.images import Preprocess, to_float
from .episodes import EpisodeSampler
from .errors import FewshotError
from .methods.base import DataInfo, Method
from .evaluate import EvalResult, evaluate
from .models import set_channels_last
from .precision import PRECISIONS, autocast, resolve_channels_last, resolve_device, resolve_precision
from .train import TrainResult, train
from .finetune import check_finetune, find_finetune, with_finetune
from .tta import with_tta


# ------------------------------------------------------------------------------------------ splits
def split_dataset(ds: ClassDataset, cfg: RunConfig) -> tuple:
    """(train, val, test) class splits of ``ds`` as the config says; ``val`` is None without a validation
    split, ``test`` is None for ``split: none`` (every class trains but the validation share)."""
    sp = parse_split(cfg.split)
    if sp["kind"] == "auto":     # the split the data comes with (mini-ImageNet's), else a seeded 80-20
        sp = {"kind": "published"} if fsdata.has_published_split(ds) else parse_split("fraction:0.2")
    val = None
    if sp["kind"] == "published":
        train, val, test = fsdata.published_split(ds)
    elif sp["kind"] == "none":
        train, test = ds, None
    elif sp["kind"] == "fraction":
        train, test = ds.split_fraction(test=sp["test"], seed=cfg.split_seed)
    elif sp["kind"] == "named":
        from .data.cifar import named_split
        train, val, test = named_split(ds, sp["name"])
    elif sp["kind"] == "group":
        if sp["val"]:
            train, val, test = ds.split_by_group(sp["test"], sp["val"])
        else:
            train, test = ds.split_by_group(sp["test"])
    else:
        lists = [_read_list(sp["train"]), _read_list(sp["test"])]
        if sp["val"]:
            lists.append(_read_list(sp["val"]))
        parts = ds.split_by_names(*lists)
        train, test = parts[0], parts[1]
        val = parts[2] if len(parts) > 2 else None
        overlap = set(train.names) & set(test.names)
        if overlap:
            raise FewshotError(f"class {sorted(overlap)[0]!r} is in both the train and test lists")
    if val is None and cfg.val_fraction > 0:
        if len(train) >= 4:
            train, val = train.split_fraction(test=cfg.val_fraction, seed=cfg.split_seed + 1)
    return train, val, test


def read_attributes(path: str) -> dict:
    """``{class name: [floats]}`` from a CSV with one row per class: the name, then the vector's entries
    (a header row whose entries after the first are not numbers is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FewshotError(f"no such attribute file: {path}")
    table, width = {}, None
    with open(p, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or not "".join(row).strip():
                continue
            try:
                vec = [float(v) for v in row[1:]]
            except ValueError:
                if i == 0:
                    continue
                raise FewshotError(f"{path}, row {i + 1}: entries after the class name must be numbers") from None
            if not vec or (width is not None and len(vec) != width):
                raise FewshotError(f"{path}, row {i + 1}: expected {width or 'at least 1'} numbers, got {len(vec)}")
            width = len(vec)
            table[row[0].strip()] = vec
    if not table:
        raise FewshotError(f"{path} holds no class vectors")
    return table


def with_run_attributes(ds: ClassDataset, cfg: RunConfig) -> ClassDataset:
    """``ds`` with the semantic class vectors of ``cfg.attributes`` attached (unchanged when there are none)."""
    return ds.with_attributes(read_attributes(cfg.attributes)) if cfg.attributes else ds


def _read_list(path: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise FewshotError(f"no such class-list file: {path}")
    return [l.strip() for l in p.read_text().splitlines() if l.strip() and not l.startswith("#")]


# ------------------------------------------------------------------------------------------ fit
@dataclass
class Run:
    """A trained method loaded from a run directory."""
    method: torch.nn.Module
    config: RunConfig
    preprocess: Preprocess
    path: Path
    device: torch.device
    precision: str
    checkpoint: dict
    #: how training went (steps, time, early stop), when the run was just trained by :func:`fit`
    train_result: Optional[TrainResult] = None


def fit(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True, on_step=None,
        dataset: Optional[ClassDataset] = None, overwrite: bool = False, check_test: bool = False,
        backbone=None) -> Run:
    """Train ``cfg.method`` as configured; returns the trained run (best checkpoint loaded).

    ``backbone``: an ``nn.Module`` or a callable returning one, the network of a method that has one (see
    :func:`fewshot.methods.build`; a spec string goes in ``cfg.options["backbone"]``). The run records its
    class; reload it with ``load_run(out, backbone=...)``.

    Fields of ``cfg`` not set explicitly take the method's literature settings first
    (:func:`apply_run_defaults`), as on the command line. Before the first step the config is checked
    (:meth:`RunConfig.check`), unset validation/test episode
    settings are chosen from the data (:func:`resolve_episodes`, recorded in the run's config) and every
    sampler is checked against its classes: training, validation and, with ``check_test``, the test
    episodes a final evaluation will draw (``fit`` itself does not test; ``fewshot train`` asks for the check
    unless given ``--no-eval``).

    The run folder is claimed first (:class:`fewshot.rundir.RunFolder`): ``out`` must be writable, it is
    locked while the run uses it (a second run on it is refused, naming the holder), ``overwrite`` replaces
    only the files an earlier fewshot run wrote there (a folder fewshot did not create is refused), and
    without it (and without ``resume``) an existing run is an error rather than being mixed with the new one.
    ``resume`` continues the run exactly and refuses settings that differ from the run's, except a longer
    run (more episodes, a longer time limit).

    With ``cfg.pretrain_epochs`` the method's backbone is first pretrained as a classifier of the training
    classes (:mod:`fewshot.pretrain`, ``checkpoints/pretrain.pt``; a resume during it continues it, a resume
    after it skips it); ``on_step`` is called after every optimiser step of both stages, each counting its
    own steps from 1.
    """
    out = Path(out)
    distributed.init(resolve_device(cfg.device))     # under torchrun: join the other ranks (else nothing)
    with contextlib.ExitStack() as stack:   # rank 0 alone claims the folder; its refusal stops every rank
        folder = distributed.on_main(lambda: stack.enter_context(
            rundir.RunFolder(out, resume=resume, overwrite=overwrite)), "claiming the run folder")
        return _fit(cfg, out, folder, resume, progress, on_step, dataset, check_test, backbone)


def apply_run_defaults(cfg: RunConfig) -> None:
    """Give every field of ``cfg`` (and of ``cfg.train``) that was not set explicitly (see
    :mod:`fewshot.explicit`; a recipe file sets them all) the value of the method's ``run_defaults``, in
    place. A literature value equal to the evaluation protocol's (:data:`PROTOCOL_DEFAULTS`, e.g. maml's
    ``val_queries: 15``) is left unset, so that :func:`resolve_episodes` derives it from the data."""
    from .explicit import explicit
    given, given_train = explicit(cfg), explicit(cfg.train)
    for k, v in methods.get(cfg.method).run_defaults.items():
        if k == "train":
            for tk, tv in v.items():
                if tk not in given_train:
                    setattr(cfg.train, tk, tv)
        elif k not in given and PROTOCOL_DEFAULTS.get(k, object()) != v:
            setattr(cfg, k, v)


def _fit(cfg: RunConfig, out: Path, folder: rundir.RunFolder, resume: bool, progress: bool, on_step,
         dataset: Optional[ClassDataset], check_test: bool, backbone=None) -> Run:
    """:func:`fit` inside its claimed run folder (nothing in ``out`` changes before ``folder.create``)."""
    device = distributed.init(resolve_device(cfg.device))       # cuda:LOCAL_RANK for a rank under torchrun
    cfg.precision = resolve_precision(cfg.precision, device)
    cfg.channels_last = resolve_channels_last(cfg.channels_last, device)
    cfg.train.precision, cfg.train.channels_last, cfg.train.seed = cfg.precision, cfg.channels_last, cfg.seed
    if resume:
        saved = out / "config.yaml"
        if saved.is_file():
            old = RunConfig.load(saved)
            if old.method != cfg.method:
                raise FewshotError(f"{out} holds a {old.method!r} run, not {cfg.method!r}")
    from .explicit import explicit
    user_set = explicit(cfg)            # before the method's literature settings fill the rest
    apply_run_defaults(cfg)
    cfg.check()
    distributed.check_batch(cfg.batch, cfg.train.task_group)     # before the folder is touched
    if dataset is None and tasks.is_family(cfg.data):      # classes given in Python take precedence
        return _fit_family(cfg, out, folder, device, resume, progress, on_step, backbone, check_test)
    resolve_image_settings(cfg, dataset)
    if dataset is not None:
        ds = dataset
    elif unsupervised.unlabeled_source(cfg):      # images without classes (label-free tasks only)
        ds = unsupervised.load_unlabeled(cfg)
    else:
        ds = fsdata.load(cfg.data, size=cfg.size, channels=cfg.channels, labels=cfg.labels,
                         label_pattern=cfg.label_pattern, invert=cfg.invert, mmap=cfg.mmap)
    ds = with_run_attributes(ds, cfg)
    label_free = unsupervised.label_free(cfg)
    train_ds, val_ds, test_ds = unsupervised.split(ds, cfg) if label_free else split_dataset(ds, cfg)
    if cfg.rotations:
        train_ds = train_ds.with_rotations()
    fitted = "" if label_free else fit_training_episodes(cfg, train_ds, user_set)
    data = DataInfo(outputs=cfg.ways, attr_dim=int(ds.attributes.shape[1]) if ds.attributes is not None else 0)
    cfg.options = methods.get(cfg.method).configure(cfg.options, data)
    torch.manual_seed(cfg.seed)
    # bad method options (and a backbone that cannot be built or does not fit) fail first, before --out changes
    method = build_method(cfg, ds.image_shape, backbone)
    pretrain.check(method, cfg)
    # every sampler's shape is checked here, before the first step (the test one too, unless not wanted)
    if not cfg.train.val_every:
        val_ds = None
    chosen = "; ".join(c for c in (fitted, resolve_episodes(cfg, val_ds, test_ds)) if c)
    semi = dict(unlabeled=cfg.unlabeled, distractors=cfg.distractors)
    if label_free:          # CACTUs / UMTRA tasks from the training images alone (their labels unused)
        sampler = unsupervised.task_sampler(cfg, train_ds, device, prepare=not resume)
    else:
        sampler = episode_sampler("training", train_ds, cfg.ways, cfg.shots, cfg.queries, batch=cfg.batch,
                                  device=device, seed=cfg.seed, transform=build_transform(cfg.augment),
                                  same_group=cfg.same_group, **semi)
    val_sampler = None
    if val_ds is not None:
        val_sampler = episode_sampler("validation", val_ds, cfg.val_ways, cfg.val_shots, cfg.val_queries,
                                      device=device, seed=1, **semi)
    if test_ds is not None and check_test:
        episode_sampler("test", test_ds, cfg.test_ways, cfg.test_shots, cfg.test_queries, dtype=None, **semi)
    if chosen and distributed.is_main():
        print(f"fewshot: {chosen}", file=sys.stderr)

    def prepare_folder() -> None:
        folder.create(cfg)      # creates, cleans and locks the folder, refuses changed settings on resume
        for name, part in (("train", train_ds), ("val", val_ds), ("test", test_ds)):
            if part is not None:
                folder.write_text(f"classes_{name}.txt", "".join(n + "\n" for n in part.names))
    distributed.on_main(prepare_folder, "preparing the run folder")     # rank 0 writes, the others wait
    meta = {"preprocess": ds.preprocess.to_dict(), "run_config": cfg.to_dict(), "data_source": ds.source}
    # the pretraining stage (--pretrain-epochs); skipped by a resume past it. Under torchrun every rank runs the
    # same stage on the same batches and rank 0 alone writes (train() then starts every rank from rank 0's weights)
    resume = pretrain.run_stage(method, train_ds, cfg, out, device, resume=resume, progress=progress,
                                on_step=on_step)
    result = train(method, sampler, cfg.train, out, val_sampler=val_sampler, resume=resume, meta=meta,
                   progress=progress, on_step=on_step)
    # rank 0 finishes the checkpoints before every rank reads the best one back
    distributed.on_main(lambda: _post_train(cfg.method, out, train_ds, device, cfg.seed, backbone), "post_train")
    run = load_run(out, "best", device=device, backbone=_fresh(backbone))
    run.train_result = result
    return run


def _fresh(backbone):
    """A module given in Python, copied (a loaded run must not share the trained method's module)."""
    import copy
    return copy.deepcopy(backbone) if isinstance(backbone, torch.nn.Module) else backbone


#: validation and test episodes when the run does not set them: 5 ways, 15 queries per class (the
#: literature's usual protocol), fewer when the data or a fixed-size head cannot supply them
EVAL_WAYS, EVAL_QUERIES = 5, 15
#: the episode settings :func:`resolve_episodes` derives when unset, with the value it starts from; a
#: method's literature defaults that state these same values (maml: ``val_queries: 15``) are left unset by
#: the CLI, so that they hold wherever the data allows and are lowered (and said) where it does not
PROTOCOL_DEFAULTS = {"val_ways": EVAL_WAYS, "test_ways": EVAL_WAYS, "val_queries": EVAL_QUERIES,
                     "test_queries": EVAL_QUERIES}

#: the flags of each episode setting, for messages
_FLAGS = {"training": ("--ways", "--shots", "--queries"),
          "validation": ("--val-ways", "--val-shots", "--val-queries"),
          "test": ("--test-ways", "--test-shots", "--test-queries")}


def head_size(cfg: RunConfig) -> Optional[int]:
    """The most ways a method with a fixed-size classification head (an ``outputs`` option, e.g. the MAML
    family) can label in a task; ``None`` when its head adapts to any number of ways."""
    if tasks.is_family(cfg.data):
        return None
    return methods.get(cfg.method).head_size(cfg.options)


def default_queries(ds: ClassDataset, shots: int, unlabeled: int = 0) -> int:
    """:data:`EVAL_QUERIES`, or fewer when the smallest class of ``ds`` has too few images for ``shots``
    support + ``unlabeled`` unlabelled + that many query images (at least 1: a class too small for even
    one query is then reported by the sampler, naming the shots)."""
    return max(1, min(EVAL_QUERIES, int(ds.counts.min()) - int(shots) - int(unlabeled)))


def resolve_image_settings(cfg: RunConfig, dataset: Optional[ClassDataset] = None) -> None:
    """Settings taken from the data, in place so the run records them. ``size: auto`` becomes the data's own
    size: that of ``dataset`` when one is given, else :func:`fewshot.data.native.native_settings` of
    ``cfg.data`` (Omniglot and glyphs 28x28, mini-ImageNet 84x84, an image folder its images' own size with
    the longer side at most 84). ``channels`` left unset become the data's own for an image folder (RGB when
    most of its images are stored in colour, else grey), and with ``size: auto`` for any image data."""
    if dataset is not None:
        if cfg.size == "auto":
            cfg.size = list(dataset.preprocess.size)
        return
    from .data.native import native_settings
    kind = fsdata.kind_of(cfg.data)
    if cfg.size != "auto" and (cfg.channels is not None or kind != "folder"):
        return
    found = native_settings(kind, cfg.data)
    if found is None:       # audio clips (the MFCC front end sizes them), or no readable image: the loader says
        cfg.size = 28 if cfg.size == "auto" else cfg.size
        return
    if cfg.size == "auto":
        cfg.size = list(found[0])
    if cfg.channels is None:
        cfg.channels = found[1]


def fit_training_episodes(cfg: RunConfig, train_ds: ClassDataset, user_set=()) -> str:
    """Lower the training ways and queries that the user did not set (not in ``user_set``: they come from the
    defaults or the method's literature settings, e.g. protonet's 60 ways, relation's 19 queries) to what the
    training classes can supply, in place: ways at most the training classes (less the distractors), queries
    at most the smallest class's images less the shots and unlabelled examples (at least 1). Small data sets
    (tens of classes x 10 images) then train with the method's recipe as far as they allow instead of
    failing; set values are left for the sampler to check. Returns a one-line description ("" if
    nothing changed)."""
    said = []
    most_ways = len(train_ds) - cfg.distractors
    if "ways" not in user_set and cfg.ways > most_ways >= 2:
        cfg.ways = most_ways
        said.append(f"{most_ways} ways (all the training classes)")
    most_queries = int(train_ds.counts.min()) - cfg.shots - cfg.unlabeled
    if "queries" not in user_set and cfg.queries > most_queries >= 1:
        cfg.queries = most_queries
        said.append(f"{most_queries} queries per class (the smallest training class has "
                    f"{int(train_ds.counts.min())} images)")
    if not said:
        return ""
    return f"training episodes of {' and '.join(said)}, fewer than the recipe's (--ways, --queries choose them)"


def resolve_episodes(cfg: RunConfig, val_ds: Optional[ClassDataset], test_ds: Optional[ClassDataset]) -> str:
    """Fill the validation and test episode settings the user left unset (``None``) from the data, in place
    (so the run's config records them), and check them against a fixed-size head.

    Ways: :data:`EVAL_WAYS`, at most the head's outputs; validation ways also at most the validation
    classes (validation only picks the best checkpoint, so a small validation split is used whole; the test
    ways are what the result reports, so they are never lowered to fit the test split). Queries:
    :func:`default_queries` of that split. Returns a one-line description of what was chosen ("" if
    nothing)."""
    head, semi = head_size(cfg), cfg.unlabeled
    if head is not None and cfg.ways > head:
        raise FewshotError(f"--ways {cfg.ways} is more than {cfg.method}'s {head}-way head (--outputs {head}) "
                           "can classify")
    chosen = []
    for what, ds, prefix in (("validation", val_ds, "val"), ("test", test_ds, "test")):
        if ds is None:
            continue
        picked = False
        ways = getattr(cfg, f"{prefix}_ways")
        if ways is None:
            ways, picked = min(EVAL_WAYS, head or EVAL_WAYS), True
        elif head is not None and ways > head:
            raise FewshotError(f"{_FLAGS[what][0]} {ways}: this {cfg.method} model has a {head}-way head (its "
                               f"--outputs, by default --ways); it cannot classify {ways}-way tasks")
        if what == "validation" and ways > len(ds) - cfg.distractors >= 1:
            ways, picked = len(ds) - cfg.distractors, True      # a small validation split is used whole
        setattr(cfg, f"{prefix}_ways", ways)
        shots = getattr(cfg, f"{prefix}_shots")
        if getattr(cfg, f"{prefix}_queries") is None:
            setattr(cfg, f"{prefix}_queries", default_queries(ds, shots, semi))
            picked = True
        if picked:
            chosen.append(f"{what} {ways}-way {shots}-shot {getattr(cfg, f'{prefix}_queries')}-query")
    if not chosen:
        return ""
    flags = ", ".join(f for w in ("validation", "test") for f in (_FLAGS[w][0], _FLAGS[w][2]))
    return (", ".join(chosen) + f" episodes (from the data: {EVAL_WAYS} ways and {EVAL_QUERIES} queries unless a "
            f"split, its smallest class or a fixed-size head allows fewer; {flags} choose them)")


def episode_sampler(what: str, ds: ClassDataset, ways: int, shots: int, queries: int, **kw) -> EpisodeSampler:
    """An :class:`EpisodeSampler`; an episode shape the classes cannot supply is an error naming the
    ``what`` ("training", "validation", "test") flags and their values."""
    try:
        return EpisodeSampler(ds, ways, shots, queries, **kw)
    except FewshotError as e:
        fw, fs, fq = _FLAGS[what]
        raise FewshotError(f"{what} episodes ({fw} {ways} {fs} {shots} {fq} {queries}) do not fit the {what} "
                           f"classes: {e}") from None


def has_test_split(cfg: RunConfig) -> bool:
    """Whether the run holds out test classes (or test tasks, for a task family): not for ``split: none``."""
    return tasks.is_family(cfg.data) or parse_split(cfg.split)["kind"] != "none"


def _post_train(method: str, out: Path, train_ds: ClassDataset, device, seed: int, backbone=None) -> None:
    """Methods with a ``post_train(train_dataset, seed=...)`` hook (the Siamese network calibrates its
    same/different threshold on training pairs) run it on each saved checkpoint, which is re-saved with the
    updated weights/buffers and the hook's report under ``"post_train"``."""
    if methods.get(method).post_train is Method.post_train:     # the default does nothing
        return
    for which in ("best", "last"):
        r = load_run(out, which, device=device, backbone=_fresh(backbone))
        info = r.method.post_train(train_ds, seed=seed)
        r.checkpoint["model"] = {**r.checkpoint["model"], **r.method.state_dict()}   # other entries (DEML's) kept
        r.checkpoint["post_train"] = info
        checkpoint.save(r.checkpoint, out / "checkpoints" / f"{which}.pt")


#: training, validation and test tasks of a family come from differently seeded generators
FAMILY_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _fit_family(cfg: RunConfig, out: Path, folder: rundir.RunFolder, device, resume, progress, on_step,
                backbone=None, check_test: bool = False) -> Run:
    """``fit`` for task families (sine, toy-binary): tasks are drawn, not split from classes; with
    ``check_test`` the test tasks' settings are checked before the first step too."""
    train_tasks = tasks.make(cfg.data, cfg.shots, cfg.queries, batch=cfg.batch, device=device,
                             seed=cfg.seed + FAMILY_SEEDS["train"])
    if train_tasks.regression:
        cfg.ways = 0
    else:
        cfg.ways = train_tasks.ways
    cfg.options = methods.get(cfg.method).configure(cfg.options, DataInfo(outputs=train_tasks.outputs))
    for key in ("val_queries", "test_queries"):    # a family draws as many queries as asked
        if getattr(cfg, key) is None:
            setattr(cfg, key, EVAL_QUERIES)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, train_tasks.in_shape, backbone)
    pretrain.check(method, cfg)
    val_sampler = None
    if cfg.train.val_every:
        val_sampler = tasks.make(cfg.data, cfg.val_shots, cfg.val_queries, device=device,
                                 seed=FAMILY_SEEDS["val"], ways=cfg.ways or None, split="val")
    if check_test:          # the final evaluation's tasks must be drawable, before any training time is spent
        tasks.make(cfg.data, cfg.test_shots, cfg.test_queries, device=device, seed=FAMILY_SEEDS["test"],
                   ways=cfg.ways or None, split="test")
    distributed.on_main(lambda: folder.create(cfg), "preparing the run folder")
    meta = {"preprocess": Preprocess(size=(0, 0), channels=0).to_dict(), "run_config": cfg.to_dict(),
            "data_source": cfg.data, "task_family": cfg.data, "in_shape_family": list(train_tasks.in_shape)}
    result = train(method, train_tasks, cfg.train, out, val_sampler=val_sampler, resume=resume, meta=meta,
                   progress=progress, on_step=on_step)
    distributed.barrier("waiting for rank 0's checkpoints")
    run = load_run(out, "best", device=device, backbone=_fresh(backbone))
    run.train_result = result
    return run


def build_method(cfg: RunConfig, in_shape, backbone=None, load_pretrained: bool = True):
    """``cfg.method`` built with ``cfg.options`` for inputs of ``in_shape``; ``backbone`` (a module or
    callable given in Python) replaces the options' spec, and what the method records for it (its class)
    goes into ``cfg.options`` so that the run's config says what it was trained with. With
    ``cfg.concept_data`` the method comes wrapped with DEML's concept discriminator (:mod:`fewshot.concept`)."""
    opts = dict(cfg.options)
    spec = opts.pop("backbone", None)
    method = methods.build(cfg.method, in_shape, backbone=backbone if backbone is not None else spec,
                           load_pretrained=load_pretrained, **opts)
    if backbone is not None:
        cfg.options["backbone"] = method.config.backbone
    if not any(p.requires_grad for p in method.parameters()):
        raise FewshotError(f"{cfg.method} has nothing to train: every parameter is frozen (--freeze "
                           f"{cfg.options.get('freeze')}; freeze a stage instead, e.g. --freeze block3)")
    return concept.with_concept(method, cfg)     # DEML's discriminator when cfg.concept_data names a set


# ------------------------------------------------------------------------------------------ load
def load_run(path: str | Path, which: str = "best", device=None, backbone=None) -> Run:
    """Load a trained method from a run directory (or a checkpoint file).

    ``backbone``: for a run trained with a module given in Python (its config records ``instance of
    package.module.Class``), a module of that class (its weights are replaced by the checkpoint's)."""
    path = Path(path)
    if path.is_file():
        ck_path, run_dir = path, path.parent.parent
    else:
        if not path.is_dir():
            raise FewshotError(f"no such run directory: {path}")
        ck_path, run_dir = path / "checkpoints" / f"{which}.pt", path
    dev = distributed.init(resolve_device(device or "auto"))      # cuda:LOCAL_RANK for a rank under torchrun
    ck = checkpoint.load(ck_path, map_location=dev)
    for key in ("method", "method_config", "in_shape", "model", "preprocess"):
        if key not in ck:
            raise FewshotError(f"{ck_path} is not a fewshot run checkpoint (missing {key!r})")
    try:
        preprocess = Preprocess.from_dict(ck["preprocess"])
        cfg = RunConfig.from_dict(ck.get("run_config") or {"method": ck["method"]})
    except FewshotError as e:
        raise FewshotError(f"{ck_path} is not a usable fewshot run checkpoint: {e}") from None
    opts = dict(ck["method_config"])
    spec = opts.pop("backbone", None)
    # the checkpoint holds every weight: a pretrained file is not read again
    method = methods.build(ck["method"], ck["in_shape"], backbone=backbone if backbone is not None else spec,
                           load_pretrained=False, **opts)
    try:     # a DEML run's checkpoint also holds its discriminator, which prediction does not need
        method.load_state_dict(concept.method_state(ck["model"]) if cfg.concept_data else ck["model"])
    except RuntimeError as e:
        raise FewshotError(f"{ck_path} does not fit a {ck['method']} model of input shape "
                           f"{tuple(ck['in_shape'])}: {str(e).splitlines()[0]}") from None
    method.to(dev)
    channels_last = resolve_channels_last(cfg.channels_last, dev)
    set_channels_last(method, channels_last)
    method.eval()
    precision = resolve_precision(cfg.precision if cfg.precision in PRECISIONS else "auto", dev)
    return Run(method, cfg, preprocess, run_dir, dev, precision, ck)


def task_family(run: Run, data: Optional[str] = None) -> Optional[str]:
    """The task family (sine, toy-binary) to draw held-out tasks from: ``data`` if it names one, else the
    run's own family when ``data`` is not given; ``None`` for class data."""
    spec = data if data is not None else run.config.data
    trained = run.config.data if tasks.is_family(run.config.data) else None
    if tasks.is_family(spec) and trained is None:
        raise FewshotError(f"--data {spec} is a task family, but this run was trained on the classes of "
                           f"{run.config.data}; evaluate it on image classes")
    if trained is not None and not tasks.is_family(spec):
        raise FewshotError(f"this run was trained on the {trained!r} task family; --data must name a task "
                           f"family too, got {spec}")
    return spec if tasks.is_family(spec) else None


def test_classes(run: Run, data: Optional[str] = None) -> ClassDataset:
    """The held-out classes to evaluate on: all classes of ``data`` if given, else the run's test split."""
    cfg = run.config
    if data is not None:
        return with_run_attributes(fsdata.load_like(data, run.preprocess, mmap=cfg.mmap), cfg)
    if not has_test_split(cfg):
        raise FewshotError(f"run {run.path} holds out no test classes (trained with --split none); pass --data "
                           "to evaluate on the classes of another data set")
    ds = with_run_attributes(fsdata.load_like(cfg.data, run.preprocess, labels=cfg.labels,
                                              label_pattern=cfg.label_pattern, mmap=cfg.mmap), cfg)
    listed = run.path / "classes_test.txt"
    if listed.is_file():
        return ds.split_by_names(_read_list(str(listed)))[0]
    return split_dataset(ds, cfg)[2]


def evaluate_run(run: Run, data: Optional[str] = None, ways: Optional[int] = None, shots: Optional[int] = None,
                 queries: Optional[int] = None, episodes: int = 1000, seed: int = 0, progress: bool = True,
                 save: bool = True, unlabeled: Optional[int] = None, distractors: Optional[int] = None,
                 tta: Optional[int] = None, finetune_steps: Optional[int] = None,
                 finetune_lr: Optional[float] = None, baseline: bool = True) -> EvalResult:
    """Evaluate a run on held-out classes (or held-out tasks of a task family); writes
    ``eval/<N>w<K>s….json`` and the per-episode CSV. ``ways``/``shots``/``queries`` default to the run's
    test settings (``queries`` on other ``data``: :func:`default_queries` of that data);
    ``unlabeled``/``distractors`` (semi-supervised episodes), ``tta`` (test-time augmentation copies,
    :mod:`fewshot.tta`) and ``finetune_steps``/``finetune_lr`` (test-time fine-tuning, :mod:`fewshot.finetune`)
    default to the run's settings too; a fine-tuned result is tagged ``-ft<S>lr<LR>`` so it does not replace
    a plain one. ``baseline``: also score raw-pixel 1-NN on the same episodes (image classes only)."""
    cfg = run.config
    for flag, v in (("--ways", ways), ("--shots", shots), ("--queries", queries), ("--episodes", episodes)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise FewshotError(f"{flag} must be at least 1, got {v!r}")
    family = task_family(run, data)
    method, copies = tta_method(run, tta, family, finetune_steps, finetune_lr, seed)
    tuned = find_finetune(method)
    shots = cfg.test_shots if shots is None else shots
    if family is not None:
        queries = queries or cfg.test_queries or EVAL_QUERIES
        sampler = tasks.make(family, shots, queries, device=run.device, seed=FAMILY_SEEDS["test"] + seed,
                             ways=None, split="test")
        if tuple(sampler.in_shape) != tuple(run.checkpoint["in_shape"]):
            raise FewshotError(f"--data {family} tasks have inputs of shape {tuple(sampler.in_shape)}, but this "
                               f"run was trained on {tuple(run.checkpoint['in_shape'])}")
        ds = None
        tag = f"{tasks.family_tag(family)}-{shots}s{queries}q-seed{seed}"
        if getattr(sampler, "metric", None):    # a family with its own metric (copy): shots/queries unused
            tag = f"{tasks.family_tag(family)}-seed{seed}"
    else:
        ds = test_classes(run, data)
        u = cfg.unlabeled if unlabeled is None else int(unlabeled)
        d = cfg.distractors if distractors is None else int(distractors)
        head = head_size(cfg)
        if ways is None:
            ways = cfg.test_ways or min(EVAL_WAYS, head or EVAL_WAYS)
        elif head is not None and ways > head:
            raise FewshotError(f"--ways {ways}: this {cfg.method} model has a {head}-way head; it cannot "
                               f"classify {ways}-way tasks")
        if queries is None:
            queries = cfg.test_queries if data is None and cfg.test_queries else default_queries(ds, shots, u)
        try:
            sampler = EpisodeSampler(ds, ways, shots, queries, device=run.device, seed=seed, unlabeled=u,
                                     distractors=d)
        except FewshotError as e:
            raise FewshotError(f"--ways {ways} --shots {shots} --queries {queries} episodes do not fit "
                               f"{data or 'the test classes'}: {e}") from None
        tag = (f"{ways}w{shots}s{queries}q" + (f"{u}u" if u else "") + (f"{d}d" if d else "") + f"-seed{seed}"
               + ("" if data is None else "-" + Path(data).name) + (f"-tta{copies}" if copies else "")
               + (f"-ft{tuned.steps}lr{tuned.lr:g}" if tuned is not None else ""))
    save = save and distributed.is_main()       # under torchrun every rank scores, rank 0 writes
    csv_path = run.path / "eval" / f"{tag}.csv" if save else None
    res = evaluate(method, sampler, episodes, precision=run.precision, progress=progress, csv_path=csv_path,
                   desc=f"eval {family}" if family is not None else f"eval {ways}w{shots}s", baseline=baseline)
    if save:
        (run.path / "eval" / f"{tag}.json").write_text(json.dumps(
            {**res.summary(), "data": data or run.config.data, "classes": len(ds) if ds is not None else None,
             "checkpoint_step": run.checkpoint.get("step")}, indent=1))
        rundir.record(csv_path)             # fewshot's files in the run folder, for --overwrite
        rundir.record(run.path / "eval" / f"{tag}.json")
    return res


def evaluate_variable_run(run: Run, data: Optional[str] = None, episodes: int = 600, seed: int = 0,
                          save: bool = True) -> EvalResult:
    """Evaluate a run on Meta-Dataset's variable-way, variable-shot episodes (:mod:`fewshot.metadataset`)
    drawn from its test classes (or all classes of ``data``); writes ``eval/metadataset-seed<S>….json``."""
    from .metadataset import MetaDatasetSampler, evaluate_variable
    if task_family(run, data) is not None:
        raise FewshotError("--protocol meta-dataset draws episodes from image classes, not from a task family")
    ds = test_classes(run, data)
    sampler = MetaDatasetSampler(ds, device=run.device, seed=seed)
    res = evaluate_variable(run.method, sampler, episodes, precision=run.precision)
    if save and distributed.is_main():
        tag = f"metadataset-seed{seed}" + ("" if data is None else "-" + Path(data).name)
        path = run.path / "eval" / f"{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_text(path, json.dumps({**res.summary(), "data": data or run.config.data, "classes": len(ds),
                                            "checkpoint_step": run.checkpoint.get("step")}, indent=1))
        rundir.record(path)
    return res


def adapts_in_environment(run: Run, data: Optional[str] = None) -> bool:
    """Whether ``run`` is evaluated on RL tasks (``data``, else its own family), where evaluation reports
    the return after each number of adaptation steps (:func:`adaptation_curve`)."""
    family = task_family(run, data)
    return family is not None and getattr(tasks.FAMILIES.get(tasks.family_name(family)), "metric", None) == "return"


ADAPTATION_STEPS = (0, 1, 2, 3)


def adaptation_curve(run: Run, data: Optional[str] = None, episodes: Optional[int] = None,
                     shots: Optional[int] = None, seed: int = 0, steps=ADAPTATION_STEPS, save: bool = True) -> dict:
    """RL runs: ``{k: (mean return, 95% CI)}`` over ``episodes`` held-out tasks (default: the run's
    ``test_episodes``) after ``k`` policy-gradient steps for each ``k`` in ``steps``, each step adapting on
    ``shots`` fresh rollouts per task (default: the run's ``test_shots``); writes ``eval/adaptation-….json``."""
    from .rl.meta import evaluate_adaptation
    cfg = run.config
    family = task_family(run, data)
    if not run.method.adapts_by_gradient:
        raise FewshotError(f"method {cfg.method} does not adapt by gradient steps; RL evaluation needs one")
    episodes = episodes or cfg.test_episodes
    shots = shots or cfg.test_shots or cfg.shots
    for flag, v in (("--episodes", episodes), ("--shots", shots)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FewshotError(f"{flag} must be at least 1, got {v!r}")
    sampler = tasks.make(family, shots, shots, device=run.device, seed=FAMILY_SEEDS["test"] + seed,
                         split="test")
    if tuple(sampler.in_shape) != tuple(run.checkpoint["in_shape"]):
        raise FewshotError(f"--data {family} tasks have observations of shape {tuple(sampler.in_shape)}, but "
                           f"this run was trained on {tuple(run.checkpoint['in_shape'])}")
    curve = evaluate_adaptation(run.method, sampler, episodes, tuple(steps), rollouts=shots)
    if save and distributed.is_main():          # under torchrun: rank 0 writes
        path = run.path / "eval" / f"adaptation-{tasks.family_tag(family)}-{shots}r-seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"data": family, "tasks": episodes, "rollouts_per_step": shots, "seed": seed,
                                    "returns": {str(k): {"mean": m, "ci95": c} for k, (m, c) in curve.items()},
                                    "checkpoint_step": run.checkpoint.get("step")}, indent=1))
        rundir.record(path)
    return curve


def tta_method(run: Run, tta: Optional[int], family: Optional[str] = None, finetune_steps: Optional[int] = None,
               finetune_lr: Optional[float] = None, seed: int = 0) -> tuple:
    """``(method to predict with, copies)``: the run's method, fine-tuned on each task's support set when
    ``finetune_steps`` (if given, else the run's own setting) asks for steps (:mod:`fewshot.finetune`,
    seeded by ``seed``), then wrapped for test-time augmentation when ``tta`` (if given, else the run's own
    setting) asks for copies."""
    copies = run.config.tta if tta is None else int(tta)
    if copies < 0:
        raise FewshotError(f"--tta takes a number of copies >= 0, got {copies}")
    if copies and family is not None:
        raise FewshotError(f"test-time augmentation jitters images; the {family!r} tasks have none")
    steps = run.config.finetune_steps if finetune_steps is None else finetune_steps
    lr = run.config.finetune_lr if finetune_lr is None else finetune_lr
    check_finetune(steps, lr)
    if steps and family is not None:
        raise FewshotError(f"--finetune-steps: test-time fine-tuning adapts on jittered support images; the "
                           f"{family!r} tasks have none")
    tuned = with_finetune(run.method, steps, lr, run.config.augment, seed=seed)
    return with_tta(tuned, copies, run.config.augment), copies


def pair_metrics(run: Run, data: Optional[str] = None, pairs: int = 1000, seed: int = 0,
                 save: bool = True) -> Optional[dict]:
    """Verification metrics on held-out classes for methods that score pairs (``pair_metrics``, e.g. the
    Siamese network): binary same/different accuracy at the calibrated threshold and triplet accuracy, with
    95% CIs; writes ``eval/pairs-<P>-seed<S>.json``. ``None`` for other methods or task families."""
    if task_family(run, data) is not None:
        return None
    ds = test_classes(run, data)
    res = run.method.pair_metrics(ds, pairs=pairs, seed=seed)
    if res is None:
        return None
    if save and distributed.is_main():          # under torchrun: rank 0 writes
        (run.path / "eval").mkdir(parents=True, exist_ok=True)
        tag = f"pairs-{pairs}-seed{seed}" + ("" if data is None else "-" + Path(data).name)
        (run.path / "eval" / f"{tag}.json").write_text(json.dumps(
            {**res, "data": data or run.config.data, "classes": len(ds),
             "checkpoint_step": run.checkpoint.get("step")}, indent=1))
        rundir.record(run.path / "eval" / f"{tag}.json")
    return res


# ------------------------------------------------------------------------------------------ predict
@torch.no_grad()
def predict_run(run: Run, support: str, query: Sequence[str], out_csv: Optional[str | Path] = None,
                tta: Optional[int] = None, finetune_steps: Optional[int] = None,
                finetune_lr: Optional[float] = None) -> list:
    """Label query images from a support folder (one subfolder of a few images per class).

    ``tta``: test-time augmentation copies (:mod:`fewshot.tta`; default: the run's setting);
    ``finetune_steps``/``finetune_lr``: test-time fine-tuning on the support folder first
    (:mod:`fewshot.finetune`; default: the run's setting; every class needs the same number of images).

    Returns [(query path, predicted class, probability)] and writes them as CSV when ``out_csv`` is given.
    """
    if tasks.is_family(run.config.data):
        raise FewshotError(f"predict labels image files; this run was trained on the {run.config.data!r} task "
                           "family (use method.predict in Python for its tasks)")
    if out_csv is not None and Path(out_csv).is_dir():
        raise FewshotError(f"--out {out_csv} is a folder; name the CSV file to write")
    sup = fsdata.load_support(support, run.preprocess)
    files: List[Path] = []
    for q in query:
        files.extend(fsdata.list_queries(q, run.preprocess))
    if not files:
        raise FewshotError("no query images given")
    qx = fsdata.load_queries(files, run.preprocess)
    sx = to_float(sup.data).unsqueeze(0).to(run.device)
    sy = sup.labels().unsqueeze(0).to(run.device)
    qxf = to_float(qx).unsqueeze(0).to(run.device)
    method, _ = tta_method(run, tta, finetune_steps=finetune_steps, finetune_lr=finetune_lr)
    with autocast(run.device, run.precision):
        logits = method.predict(sx, sy, qxf, len(sup))
    prob = logits.float().softmax(-1)[0]
    conf, pred = prob.max(-1)
    rows = [(str(f), sup.names[int(p)], float(c)) for f, p, c in zip(files, pred, conf)]
    if out_csv is not None:
        out_csv = Path(out_csv)
        try:
            out_csv.parent.mkdir(parents=True, exist_ok=True)
            with open(out_csv, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["query", "predicted", "probability"])
                for r in rows:
                    w.writerow([r[0], r[1], f"{r[2]:.4f}"])
            rundir.record(out_csv)
        except OSError as e:
            raise FewshotError(f"cannot write --out {out_csv}: {e.strerror or e}") from None
    return rows


# ------------------------------------------------------------------------------------------ Lake runs
@torch.no_grad()
def lake_eval(run: Run, path: str, tta: Optional[int] = None) -> dict:
    """Error rate on Lake et al.'s 20 Omniglot one-shot runs (each 20-way 1-shot within one alphabet);
    ``tta``: test-time augmentation copies (default: the run's setting)."""
    runs = fsdata.load_lake_runs(path, run.preprocess)
    method, copies = tta_method(run, tta)
    per_run, wrong_total, n_total = [], 0, 0
    for r in runs:
        sx = to_float(r.train).unsqueeze(0).to(run.device)
        sy = torch.arange(r.train.shape[0], device=run.device).unsqueeze(0)
        qx = to_float(r.test).unsqueeze(0).to(run.device)
        with autocast(run.device, run.precision):
            pred = method.predict(sx, sy, qx, r.train.shape[0]).float().argmax(-1)[0].cpu()
        wrong = int((pred != r.labels).sum())
        per_run.append({"run": r.name, "errors": wrong, "n": len(r.labels),
                        "error_rate": 100.0 * wrong / len(r.labels)})
        wrong_total += wrong
        n_total += len(r.labels)
    res = {"runs": per_run, "error_rate": 100.0 * wrong_total / max(n_total, 1), "n": n_total, "tta": copies}
    if distributed.is_main():                   # under torchrun: rank 0 writes
        (run.path / "eval").mkdir(parents=True, exist_ok=True)
        (run.path / "eval" / "lake_runs.json").write_text(json.dumps(res, indent=1))
        rundir.record(run.path / "eval" / "lake_runs.json")
    return res
