"""Command line: ``fewshot train|eval|predict|plot|methods|recommend``. Thin: parse, then call :mod:`fewshot.run`.

User errors (bad paths, unreadable images, wrong checkpoints, impossible episode shapes) print one line
``fewshot: error: ...`` and exit with status 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import List, Optional

from .errors import FewshotError


def _parse_bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _int_list(v: str) -> List[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {v!r}") from None


def _size(v: str):
    if v.strip().lower() == "auto":        # the data's own size (fewshot.data.native), resolved by the run
        return "auto"
    parts = _int_list(v.replace("x", ","))
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts
    raise argparse.ArgumentTypeError(f"size must be N, HxW or auto, got {v!r}")


def field_docs(cls) -> dict:
    """The ``#:`` comment written after each field of a dataclass and of its dataclass bases, by field name
    (a subclass's comment wins); fields without one are left out. Classes whose source cannot be read
    (built at run time) contribute nothing; their bases still do."""
    import inspect
    import re
    docs: dict = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list = []                       # "#:" lines just before a field document it too
        for line in src.splitlines():
            m = re.match(r"^\s+(\w+)\s*:[^#]*?(?:#:\s*(.+))?$", line)
            if line.strip().startswith("#:"):
                above.append(line.strip()[2:].strip())
                continue
            if m and (m.group(2) or above):
                docs[m.group(1)] = (m.group(2) or " ".join(above)).strip()
            above = []
    return docs


def _add_dataclass_options(parser, cls, dest_prefix: str, skip=(), help_text: bool = True) -> None:
    """One --flag per dataclass field (underscores become dashes); defaults stay None = 'not given'.
    ``help_text``: describe each flag with its field's ``#:`` comment (reading sources costs ~0.5 s, so the
    CLI asks for it only when help is printed)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls) if help_text else {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = hints.get(f.name, str)
        if typing.get_origin(t) is typing.Union:     # Optional[X]: the flag takes an X
            inner = [a for a in typing.get_args(t) if a is not type(None)]
            t = inner[0] if len(inner) == 1 else str
        origin = typing.get_origin(t)
        if t is bool:
            kw = {"type": _parse_bool, "metavar": "BOOL"}
        elif t is int:
            kw = {"type": int}
        elif t is float:
            kw = {"type": float}
        elif origin in (list, List):
            kw = {"type": _int_list, "metavar": "A,B,..."}
        else:
            kw = {"type": str}
        kw.setdefault("metavar", f.name.upper())
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        doc = docs.get(f.name, "").replace("%", "%%")
        shown = "" if default is None and "default" in doc else f" (default: {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=dest_prefix + f.name, default=None,
                            help=f"{doc}{shown}".strip(), **kw)


def _train_parser(sub, help_text: bool = True, method: Optional[str] = None) -> None:
    """The ``train`` subcommand; ``method``: list that method's options only (``fewshot train METHOD
    --help``), else every registered method's."""
    from . import methods
    from .config import RunConfig
    from .train import TrainConfig
    p = sub.add_parser("train", help="meta-train a method; writes a run directory",
                       description="Meta-train METHOD on episodes from --data. Method options "
                                   "(see `fewshot methods`) and every config key are flags; --config FILE.yaml "
                                   "sets defaults that flags override. Without --config a method starts from "
                                   "its literature settings (maml and its variants: 5-way 1-shot 15-query, "
                                   "meta-batch 32; reptile: meta-batch 5, SGD outer step 1.0 annealed "
                                   "linearly).")
    p.add_argument("method", nargs="?", help="registered method (fewshot methods); optional with --config")
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    p.add_argument("--out", help="run directory (default: runs/METHOD)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-eval", action="store_true", help="skip the final test evaluation")
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. -O distance=cosine")
    g = p.add_argument_group("run")
    _add_dataclass_options(g, RunConfig, "run_", skip=("method", "options", "train", "augment", "size"),
                           help_text=help_text)
    g.add_argument("--size", dest="run_size", type=_size, default=None, help="image size N or HxW (default: 28)")
    g.add_argument("--augment", dest="run_augment", choices=["none", "affine"], default=None,
                   help="batch augmentation (default: none)")
    g.add_argument("--affine-degrees", type=float, default=None)
    g.add_argument("--affine-translate", type=float, default=None)
    tg = p.add_argument_group("training")
    _add_dataclass_options(tg, TrainConfig, "train_", skip=("precision", "channels_last", "seed"),
                           help_text=help_text)
    if method is not None:
        mg = p.add_argument_group(f"{method} options ({methods.describe(method)})")
    else:
        mg = p.add_argument_group("method options (apply to the method that has them; defaults: "
                                  "`fewshot methods -v`; `fewshot train METHOD --help`: that method's only)")
    meanings: dict = {}                      # option -> {its description: [methods that have it]}
    for name in ([method] if method is not None else methods.available()):
        cls = methods.get(name)
        docs = field_docs(cls.Config) if help_text else {}
        for f in dataclasses.fields(cls.Config):
            meanings.setdefault(f.name, {}).setdefault(docs.get(f.name, "method option"), []).append(name)
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(methods.get(method).Config)} if method is not None else {}
    for name in sorted(meanings):
        if method is not None:
            parts = [f"{doc} (default: {defaults[name]})" for doc in meanings[name]]
        else:
            parts = [f"{doc} [{', '.join(who) if len(who) <= 3 else f'{len(who)} methods'}]"
                     for doc, who in sorted(meanings[name].items(), key=lambda kv: -len(kv[1]))]
        mg.add_argument("--" + name.replace("_", "-"), dest="opt_" + name, default=None, metavar=name.upper(),
                        help="; ".join(parts).replace("%", "%%"))
    _launch_flags(p)
    p.set_defaults(func=cmd_train)


def _coerce_option(method: str, key: str, value):
    """Turn a string option into the type of the method's Config field."""
    from . import methods
    cls = methods.get(method)
    hints = typing.get_type_hints(cls.Config)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    if key not in names:
        raise FewshotError(f"method {method!r} has no option {key!r}; options: {', '.join(sorted(names))}")
    if not isinstance(value, str):
        return value
    t = hints[key]
    try:
        if t is bool:
            return _parse_bool(value)
        if t is int:
            return int(value)
        if t is float:
            return float(value)
        if typing.get_origin(t) in (list, List):
            return _int_list(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise FewshotError(f"bad value {value!r} for option {key}") from None
    return value


def _launch_flags(p) -> None:
    """--nproc and the multi-node rendezvous flags of train and eval (fewshot.distributed)."""
    g = p.add_argument_group("distributed (torch.distributed ranks started through torchrun's launcher)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run as N ranks on this machine, as `torchrun --nproc-per-node N -m fewshot ...` does "
                        "(gloo on CPU, NCCL on CUDA; the global --batch is shared among them)")
    g.add_argument("--nnodes", default="1", metavar="N",
                   help="machines taking part (N or MIN:MAX), each starting the same command (default 1)")
    g.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="the c10d rendezvous every node joins (with --nnodes > 1): the first node's address")
    g.add_argument("--rdzv-id", default="fewshot", help="a name the nodes of one run share (default: fewshot)")


def _launch(a) -> Optional[int]:
    """With ``--nproc`` outside torchrun: start the ranks through torch.distributed.run and return their exit
    status. ``None``: go on in this process (no --nproc, one rank, or already a rank torchrun started)."""
    from . import distributed
    single = str(a.nnodes).strip() in ("1", "1:1") and a.rdzv_endpoint is None
    if a.nproc is None:
        if not single:
            raise FewshotError("--nnodes / --rdzv-endpoint start ranks on several machines: give --nproc too")
        return None
    if distributed.launched():      # a rank: the launcher already used --nproc
        if a.nproc != int(os.environ.get("LOCAL_WORLD_SIZE", a.nproc)):
            raise FewshotError(f"--nproc {a.nproc} differs from the {os.environ['LOCAL_WORLD_SIZE']} ranks per "
                               "node torchrun started; give one of them")
        return None
    device = getattr(a, "run_device", None) or getattr(a, "device", None)
    if a.nproc == 1 and single:
        distributed.check_nproc(a.nproc, device)
        return None
    return distributed.launch(a.argv, a.nproc, a.nnodes, a.rdzv_endpoint, a.rdzv_id, device)


def cmd_train(a) -> int:
    from . import methods
    from .config import RunConfig
    from .rundir import check_out
    from .run import adaptation_curve, adapts_in_environment, evaluate_run, fit, has_test_split
    if a.resume and not a.out:
        raise FewshotError("--resume needs --out RUN_DIR (the run directory to continue)")
    launched = _launch(a)
    if launched is not None:
        return launched
    out = Path(a.out or f"runs/{a.method or 'run'}")
    if a.out:
        check_out(out)                  # a file or an unwritable folder: an error before anything else
    saved = out / "config.yaml"
    # --resume continues with the run's own settings (or --config's, to be compared with them); fit refuses
    # every flag that changes them except a longer run
    from_run = a.resume and saved.is_file() and not a.config
    if from_run:
        cfg = RunConfig.load(saved)
    else:
        cfg = RunConfig.load(a.config) if a.config else RunConfig()
    if a.method:
        methods.get(a.method)           # an unknown method: the error names the registered ones
        if (a.config or a.resume) and cfg.method != a.method:
            cfg.options = {}
        cfg.method = a.method
        # without --config the method's literature settings (run_defaults) fill what the flags below leave
        # unset: fit applies them (fewshot.run.apply_run_defaults), as for the Python API
    elif not a.config and not from_run:
        raise FewshotError("name a method (see `fewshot methods`) or pass --config")
    for k, v in vars(a).items():
        if v is None:
            continue
        if k.startswith("run_"):
            key = k[4:]
            if key == "augment":
                cfg.augment = {} if v == "none" else {"affine": dict(cfg.augment.get("affine") or {})}
            else:
                setattr(cfg, key, v)
        elif k.startswith("train_"):
            setattr(cfg.train, k[6:], v)
    if a.affine_degrees is not None or a.affine_translate is not None:
        aff = dict(cfg.augment.get("affine") or {})
        if a.affine_degrees is not None:
            aff["degrees"] = a.affine_degrees
        if a.affine_translate is not None:
            aff["translate"] = a.affine_translate
        cfg.augment = {"affine": aff}
    mcls = methods.get(cfg.method)
    mnames = {f.name for f in dataclasses.fields(mcls.Config)}
    for k, v in vars(a).items():
        if k.startswith("opt_") and v is not None:
            key = k[4:]
            if key not in mnames:
                raise FewshotError(f"method {cfg.method!r} has no option --{key.replace('_', '-')}")
            cfg.options[key] = _coerce_option(cfg.method, key, v)
    for kv in a.option:
        key, eq, val = kv.partition("=")
        if not eq:
            raise FewshotError(f"--option takes KEY=VALUE, got {kv!r}")
        cfg.options[key.replace("-", "_")] = _coerce_option(cfg.method, key.replace("-", "_"), val)
    cfg.check()      # every setting's type and range, before anything in --out is touched
    if not a.out:
        out = Path(f"runs/{cfg.method}")
    run = fit(cfg, out, resume=a.resume, progress=not a.no_progress, overwrite=a.overwrite,
              check_test=not a.no_eval)
    res = run.train_result
    best = "" if run.checkpoint["step"] == res.steps else f", best validation at step {run.checkpoint['step']}"
    print(f"trained {cfg.method} for {res.steps} steps ({res.train_time_s:.0f} s of training{best}); "
          f"run directory: {out}")
    if not a.no_eval and not has_test_split(cfg):
        print(f"fewshot: no final test: --split none holds out no test classes (evaluate with "
              f"`fewshot eval {out} --data DATA`)", file=sys.stderr)
    elif not a.no_eval and adapts_in_environment(run):
        _print_curve(adaptation_curve(run), run.config.test_episodes, "test: ")
    elif not a.no_eval:
        res = evaluate_run(run, ways=cfg.test_ways, shots=cfg.test_shots, queries=cfg.test_queries,
                           episodes=cfg.test_episodes, progress=not a.no_progress)
        print(f"test {'accuracy' if res.metric == 'accuracy' else 'error'}: {res}")
        if res.baseline is not None:
            print(res.baseline_line())
    return 0


def _print_curve(curve: dict, tasks: int, prefix: str = "") -> None:
    """RL evaluation: one line per number of adaptation steps."""
    for k, (m, c) in curve.items():
        print(f"{prefix}after {k} steps: return {m:.2f} ± {c:.2f} (95% CI, {tasks} held-out tasks)")


def cmd_eval(a) -> int:
    from .run import (adaptation_curve, adapts_in_environment, evaluate_run, evaluate_variable_run, lake_eval,
                      load_run, pair_metrics)
    if a.pairs < 0:
        raise FewshotError(f"--pairs must be at least 0, got {a.pairs}")
    launched = _launch(a)
    if launched is not None:
        return launched
    run = load_run(a.run, a.checkpoint, device=a.device)
    if a.lake_runs:
        res = lake_eval(run, a.lake_runs, tta=a.tta)
        for r in res["runs"]:
            print(f"{r['run']}: error {r['error_rate']:.1f}% ({r['errors']}/{r['n']})")
        print(f"overall error rate: {res['error_rate']:.2f}% over {res['n']} test images "
              f"({len(res['runs'])} runs)")
        return 0
    if a.protocol == "meta-dataset":
        res = evaluate_variable_run(run, a.data, a.episodes, a.seed)
        print(f"{res.short()} (95% CI, {res.n} Meta-Dataset episodes of 5-50 ways and varying shots, seed "
              f"{res.seed})")
        return 0
    if adapts_in_environment(run, a.data):
        curve = adaptation_curve(run, a.data, episodes=a.episodes, shots=a.shots, seed=a.seed)
        _print_curve(curve, a.episodes or run.config.test_episodes)
        return 0
    res = evaluate_run(run, a.data, a.ways, a.shots, a.queries, a.episodes, a.seed, progress=not a.no_progress,
                       unlabeled=a.unlabeled, distractors=a.distractors, tta=a.tta,
                       finetune_steps=a.finetune_steps, finetune_lr=a.finetune_lr, baseline=not a.no_baseline)
    print(res)
    if res.baseline is not None:        # raw-pixel 1-NN on the same episodes: did the model learn anything?
        print(res.baseline_line())
    pm = pair_metrics(run, a.data, a.pairs, a.seed) if a.pairs else None
    if pm is not None:      # methods that score pairs (siamese): verification metrics too
        print(f"binary accuracy: {pm['binary_acc']:.2f} ± {pm['binary_ci95']:.2f} % ({pm['pairs']} balanced "
              f"pairs, threshold {pm['threshold']:.4g} calibrated on training pairs)")
        print(f"triplet accuracy: {pm['triplet_acc']:.2f} ± {pm['triplet_ci95']:.2f} % ({pm['triplets']} "
              "triplets, d(a,p) < d(a,n))")
        if res.shots == 1:
            print(f"one-shot accuracy: {res.short()} ({res.ways}-way, nearest support image)")
    return 0


def cmd_predict(a) -> int:
    from .run import load_run, predict_run
    run = load_run(a.run, a.checkpoint, device=a.device)
    out = a.out or (Path(a.run) / "predictions.csv" if Path(a.run).is_dir() else "predictions.csv")
    rows = predict_run(run, a.support, a.query, out, tta=a.tta, finetune_steps=a.finetune_steps,
                       finetune_lr=a.finetune_lr)
    for path, label, p in rows:
        print(f"{path}\t{label}\t{p:.3f}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_plot(a) -> int:
    from .plot import plot_run
    from .run import load_run
    run = load_run(a.run, a.checkpoint, device=a.device)
    for f in plot_run(run, data=a.data, max_classes=a.classes):
        print(f)
    return 0


def cmd_recommend(a) -> int:
    from .recommend import recommend
    print(recommend(a.data, a.ways, a.shots, minutes=a.minutes, measure=a.measure, split=a.split,
                    episodes=a.episodes, out=a.out, progress=not a.no_progress and a.measure))
    return 0


def cmd_methods(a) -> int:
    from . import methods
    for name in methods.available():
        cls = methods.get(name)
        opts = ", ".join(f"{f.name}={f.default if f.default is not dataclasses.MISSING else f.default_factory()}"
                         for f in dataclasses.fields(cls.Config))
        print(f"{name:12s} {methods.describe(name)}")
        if a.verbose:
            print(f"{'':12s} options: {opts}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments are a one-line error like every other user error (no usage dump); subparsers
    inherit this class."""

    def error(self, message: str):
        self.exit(2, f"fewshot: error: {message} (see `{self.prog} --help`)\n")


def build_parser(help_text: bool = True, method: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``fewshot`` parser; ``help_text=False`` skips reading the option descriptions from the sources;
    ``method``: ``train`` lists only that method's options."""
    from . import __version__
    p = _Parser(prog="fewshot", description="Few-shot and meta-learning on PyTorch.")
    p.add_argument("--version", action="version", version=f"fewshot {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub, help_text, method)

    e = sub.add_parser("eval", help="accuracy ± 95%% CI on held-out classes, or Lake's one-shot runs",
                       description="Evaluate a run on fixed-seed episodes from held-out classes (the run's "
                                   "test split, or every class of --data).")
    e.add_argument("run", help="run directory (or checkpoint file)")
    e.add_argument("--data", help="evaluate on all classes of this data set instead of the run's test split")
    e.add_argument("--ways", type=int, default=None, help="default: the run's test ways")
    e.add_argument("--shots", type=int, default=None, help="default: the run's test shots")
    e.add_argument("--queries", type=int, default=None,
                   help="queries per class (default: the run's test queries; with --data, 15 or fewer when "
                        "its smallest class is too small)")
    e.add_argument("--episodes", type=int, default=1000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--unlabeled", type=int, default=None,
                   help="unlabelled examples per way (semi-supervised; default: as trained)")
    e.add_argument("--distractors", type=int, default=None,
                   help="distractor classes among the unlabelled examples (default: as trained)")
    e.add_argument("--pairs", type=int, default=1000,
                   help="balanced pairs (and triplets) for the binary/triplet accuracy of pair methods "
                        "such as siamese (0: skip)")
    e.add_argument("--tta", type=int, default=None, metavar="M",
                   help="test-time augmentation: also predict from M jittered copies of every support and "
                        "query image and average (default: the run's setting, 0 = off)")
    _finetune_flags(e)
    e.add_argument("--no-baseline", action="store_true",
                   help="do not score (or print) the raw-pixel nearest-neighbour baseline on the same episodes")
    e.add_argument("--protocol", choices=["fixed", "meta-dataset"], default="fixed",
                   help="fixed: N-way K-shot episodes (default); meta-dataset: variable-way, variable-shot "
                        "episodes (Triantafillou et al. 2020), 5-50 ways, class-imbalanced supports")
    e.add_argument("--lake-runs", help="Lake et al.'s all_runs.zip (or its folder): report error rates")
    _common(e)
    _launch_flags(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="label new images from a folder of a few labelled examples per class")
    pr.add_argument("run")
    pr.add_argument("--support", required=True, help="folder with one subfolder of images per class")
    pr.add_argument("--query", required=True, nargs="+", help="image files or folders of images")
    pr.add_argument("--out", help="CSV to write (default: RUN/predictions.csv)")
    pr.add_argument("--tta", type=int, default=None, metavar="M",
                    help="test-time augmentation copies per image (default: the run's setting, 0 = off)")
    _finetune_flags(pr)
    _common(pr)
    pr.set_defaults(func=cmd_predict)

    pl = sub.add_parser("plot", help="learning curves and a t-SNE of held-out class embeddings (PNG)")
    pl.add_argument("run")
    pl.add_argument("--data", help="embed classes of this data set instead of the run's test split")
    pl.add_argument("--classes", type=int, default=10, help="held-out classes in the t-SNE picture")
    _common(pl)
    pl.set_defaults(func=cmd_plot)

    m = sub.add_parser("methods", help="list the registered methods")
    m.add_argument("--verbose", "-v", action="store_true", help="also list each method's options")
    m.set_defaults(func=cmd_methods)

    r = sub.add_parser("recommend", help="which method: the rule of thumb, the measured answer, or measure it",
                       description="Print the rule of thumb's method for N-way K-shot tasks on --data (fewer "
                                   "than 5 shots: protonet; fewer than 1000 meta-training images: relation; "
                                   "else maml), the best method at the nearest setting of the package's "
                                   "measured tables (from BENCHMARKS.md), and why the two disagree. --measure "
                                   "also trains the candidates briefly on --data and ranks them.")
    r.add_argument("--data", required=True, help="data set name or path (as for train)")
    r.add_argument("--ways", type=int, required=True)
    r.add_argument("--shots", type=int, required=True)
    r.add_argument("--minutes", type=float, default=None,
                   help="training time available: only recorded runs within it count; with --measure, the "
                        "candidates' total training time (default 3)")
    r.add_argument("--measure", action="store_true", help="train protonet, relation and maml (and the two "
                   "answers' methods) on --data for the same time and episodes, and rank them")
    r.add_argument("--split", default="auto", help="class split, as for train (default: auto)")
    r.add_argument("--episodes", type=int, default=200, help="test episodes of each measured candidate")
    r.add_argument("--out", default=None, help="run directories of the measured candidates (default: a temp folder)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_recommend)
    return p


def _finetune_flags(p) -> None:
    """--finetune-steps / --finetune-lr of eval and predict (fewshot.finetune)."""
    p.add_argument("--finetune-steps", type=int, default=None, metavar="S",
                   help="test-time fine-tuning: S Adam steps adapting a copy of the method to each task's "
                        "support set (jittered support copies as pseudo-queries) before predicting; metric "
                        "methods only (default: the run's setting, 0 = off)")
    p.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help="test-time fine-tuning learning rate (default: the run's setting, 1e-3)")


def _common(p) -> None:
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--no-progress", action="store_true")


def _broken_pipe() -> int:
    """The reader of stdout went away (``fewshot methods | head -1``): stop quietly with the status of a
    process ended by SIGPIPE (141), pointing stdout at /dev/null so the exit-time flush cannot fail again."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):     # stdout without a file descriptor (captured): nothing to redirect
        pass
    return 128 + 13


def _named_method(argv: List[str]) -> Optional[str]:
    """The registered method ``fewshot train METHOD ...`` names, if any."""
    if len(argv) < 2 or argv[0] != "train":
        return None
    from . import methods
    return argv[1] if argv[1] in methods.available() else None


def _rank_tag() -> str:
    """``"rank N: "`` in a rank other than 0 that torchrun started (whose messages rank 0 usually repeats)."""
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    return "" if rank == "0" else f"rank {rank}: "


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_help = any(str(a) in ("-h", "--help") for a in argv)
    parser = build_parser(help_text=wants_help, method=_named_method(argv) if wants_help else None)
    args = parser.parse_args(argv)
    args.argv = argv            # what --nproc hands to each rank it starts
    if _rank_tag():
        sys.stdout = open(os.devnull, "w")      # rank 0 prints the results; errors still show on stderr
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        status = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, not at interpreter exit
        return status
    except FewshotError as e:
        print(f"fewshot: error: {_rank_tag()}{e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .distributed import DistributedError
        if not isinstance(e, DistributedError):
            raise
        print(f"fewshot: error: {e}", file=sys.stderr)     # a rank stopped: not the user's error, one line too
        return 1
    except BrokenPipeError:
        return _broken_pipe()
    except KeyboardInterrupt as e:
        from .train import TrainingInterrupted     # says what was saved; any other Ctrl-C came outside training
        print(f"fewshot: {_rank_tag()}{e}" if isinstance(e, TrainingInterrupted) else "fewshot: interrupted",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
