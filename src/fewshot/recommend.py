"""Which method to use: the rule of thumb, the measured answer from the package's own result tables, and
(optionally) a short measurement on the user's data.

* **Rule of thumb** (METHODS.md §6): fewer than 5 shots -> prototypical network; fewer than 1 000
  meta-training examples -> relation network; otherwise MAML (:func:`rule_of_thumb`).
* **Measured**: the best method at the nearest measured setting (ways and shots, on a log scale) of the
  result tables shipped with the package (``recommend_tables/measured.json``), generated from the recorded
  benchmark outputs in BENCHMARKS.md by :func:`tables_from_markdown` (``python benchmarks/recommend_tables.py``
  rewrites the file; a test checks the two agree). With a time budget only runs trained within it count.
* **Measure** (``measure=True``): train each candidate for the same short budget on the user's data on the
  same training episodes (same seed, ways, shots, queries, one task per step) and rank them on the same
  fixed-seed test episodes, with 95% CIs (:func:`measure_candidates`).

Where the rule and the tables disagree, :func:`recommend` says so and why (what the rule assumed, what was
measured, and how far the measured setting is from the user's).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from .errors import FewshotError

TABLES = Path(__file__).with_name("recommend_tables") / "measured.json"
#: the rule's thresholds
FEW_SHOTS, SMALL_DATA = 5, 1000

#: BENCHMARKS.md sections whose recorded tables feed the shipped tables: heading -> (data set, training
#: images, training minutes when a row does not say)
SECTIONS = {
    "Prototypical network, Omniglot minimal sets, unseen alphabets": ("omniglot-small", 3700, 29.0),
    "MAML on Omniglot minimal sets, unseen alphabets": ("omniglot-small", 3700, 60.0),
    "First-order MAML, ANIL, Meta-SGD and Reptile, same split": ("omniglot-small", 3700, 40.0),
    "Metric methods on Omniglot minimal sets, unseen alphabets, same training time": ("omniglot-small", 3700, 4.0),
    "Meta-LSTM learner on Omniglot minimal sets, unseen alphabets": ("omniglot-small", 3700, 50.0),
}
#: how a row or column label of those tables names a registered method (first match wins; ``None``: not
#: comparable: the semi-supervised rows' test episodes also hold unlabelled images, a different task)
METHOD_WORDS = [("semi-supervised", None), ("siamese", "siamese"), ("first-order maml", "fomaml"),
                ("anil", "anil"), ("meta-sgd", "metasgd"), ("reptile", "reptile"), ("metalstm", "metalstm"),
                ("maml", "maml"), ("task-conditioned", "taskcond"), ("hallucination", "hallucinate"),
                ("gaussian", "gaussian"), ("relation", "relation"), ("matching", "matching"),
                ("prototypical", "protonet"), ("protonet", "protonet")]
_SETTING = re.compile(r"(\d+)\s*-?\s*(?:way|w)\s*,?\s*(\d+)\s*-?\s*(?:shot|s)\b", re.I)
_VALUE = re.compile(r"(\d+(?:\.\d+)?)\s*±\s*(\d+(?:\.\d+)?)")
_MINUTES = re.compile(r"(\d+(?:\.\d+)?)\s*min")


# ------------------------------------------------------------------------------------------ tables
def method_of(label: str) -> Optional[str]:
    """The registered method a table label names (``"matching + FCE"`` -> ``matching``), or ``None`` (a peer
    library, a published figure, something else)."""
    low = label.lower()
    if "published" in low or "easyfsl" in low or "learn2learn" in low:
        return None
    for word, method in METHOD_WORDS:
        if word in low:
            return method
    return None


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _fenced_tables(body: str) -> list:
    """The markdown tables inside ``` fences of a section (the recorded benchmark outputs), each as
    ``(header cells, [row cells])``."""
    out, fenced, rows = [], False, []
    for line in body.splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
        is_row = fenced and line.lstrip().startswith("|")
        if is_row:
            rows.append(line)
            continue
        if len(rows) >= 3:
            out.append((_cells(rows[0]), [_cells(r) for r in rows[2:]]))
        rows = []
    return out


def tables_from_markdown(text: str) -> list:
    """Measured entries from the recorded tables of :data:`SECTIONS` in BENCHMARKS.md text: one dict per
    (method label, setting) cell with ``method, label, ways, shots, mean, ci95, minutes, data,
    train_images, section``. A table either has a method per row and settings as columns (``5-way 1-shot``,
    ``5w1s, test 10 (%)``) or a setting per row and methods as columns (``fewshot protonet (%)``)."""
    sections = re.split(r"(?m)^#{2,3} ", text)
    entries = []
    for sec in sections[1:]:
        heading, _, body = sec.partition("\n")
        heading = heading.strip()
        if heading not in SECTIONS:
            continue
        data, images, minutes = SECTIONS[heading]
        for header, rows in _fenced_tables(body):
            time_col = next((i for i, h in enumerate(header) if h.lower().startswith("training")), None)
            setting_cols = [(i, _SETTING.search(h)) for i, h in enumerate(header)]
            setting_cols = [(i, m) for i, m in setting_cols if m]
            for r in rows:
                if len(r) != len(header):
                    continue
                row_setting = _SETTING.search(r[0])
                if setting_cols:              # a method per row
                    cells = [(r[0], i, m) for i, m in setting_cols]
                elif row_setting:             # a setting per row, methods in the columns
                    cells = [(header[i], i, row_setting) for i in range(1, len(header))]
                else:
                    continue
                row_minutes = minutes
                if time_col is not None and _MINUTES.search(r[time_col]):
                    row_minutes = float(_MINUTES.search(r[time_col]).group(1))
                for label, i, m in cells:
                    method, v = method_of(label), _VALUE.search(r[i])
                    if method is None or v is None:
                        continue
                    col = header[i] if setting_cols else ""
                    entries.append({"method": method, "label": label + (f" [{col}]" if col else ""),
                                    "ways": int(m.group(1)), "shots": int(m.group(2)), "mean": float(v.group(1)),
                                    "ci95": float(v.group(2)), "minutes": row_minutes, "data": data,
                                    "train_images": images, "section": heading})
    return entries


def shipped_tables() -> list:
    """The measured entries shipped with the package."""
    return json.loads(TABLES.read_text())["entries"]


def write_tables(benchmarks_md: str | Path, path: Path = TABLES) -> int:
    """Regenerate the shipped tables from BENCHMARKS.md; returns the number of entries."""
    entries = tables_from_markdown(Path(benchmarks_md).read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": "BENCHMARKS.md", "generator": "fewshot.recommend.tables_from_markdown",
                                "entries": entries}, indent=1) + "\n")
    return len(entries)


# ------------------------------------------------------------------------------------------ answers
def rule_of_thumb(shots: int, train_examples: int) -> tuple:
    """``(method, reason)`` by the rule of METHODS.md §6 (checked in this order)."""
    if shots < FEW_SHOTS:
        return "protonet", f"{shots} shot{'s' if shots != 1 else ''} < {FEW_SHOTS}: prototypical network"
    if train_examples < SMALL_DATA:
        return "relation", (f"{shots} shots, but {train_examples} meta-training examples < {SMALL_DATA}: "
                            "relation network")
    return "maml", f"{shots} shots and {train_examples} meta-training examples >= {SMALL_DATA}: MAML"


def _distance(e: dict, ways: int, shots: int) -> float:
    return abs(math.log(e["ways"] / ways)) + abs(math.log(e["shots"] / shots))


def measured_answer(ways: int, shots: int, minutes: Optional[float] = None,
                    entries: Optional[list] = None) -> dict:
    """The nearest measured setting to ``ways``-way ``shots``-shot and every method's best entry there
    (best first); with ``minutes``, only runs trained within that many minutes (all runs when none was)."""
    entries = shipped_tables() if entries is None else entries
    within = [e for e in entries if minutes is None or e["minutes"] <= minutes]
    budget_note = ""
    if minutes is not None and not within:
        within, budget_note = entries, f"no recorded run trained within {minutes:g} min; all runs shown"
    d = min(_distance(e, ways, shots) for e in within)
    at = [e for e in within if _distance(e, ways, shots) == d]
    near = min((e["ways"], e["shots"]) for e in at)
    at = [e for e in at if (e["ways"], e["shots"]) == near]
    best = {}
    for e in sorted(at, key=lambda e: -e["mean"]):
        best.setdefault(e["method"], e)
    ranked = list(best.values())
    return {"ways": near[0], "shots": near[1], "exact": d == 0, "ranked": ranked, "budget_note": budget_note,
            "minutes": None if budget_note else minutes}


@dataclass
class Recommendation:
    """What :func:`recommend` found; ``str()`` is the report the CLI prints."""
    data: str
    ways: int
    shots: int
    classes: int
    train_examples: int
    rule: str
    rule_reason: str
    measured: dict
    agree: bool
    why: str
    minutes: Optional[float] = None
    #: ``--measure``: ``[{"method", "mean", "ci95", "n", "steps", "train_s"}]`` best first
    trials: List[dict] = field(default_factory=list)

    @property
    def best_measured(self) -> str:
        return self.measured["ranked"][0]["method"]

    def lines(self) -> list:
        m = self.measured
        top = m["ranked"][0]
        out = [f"data: {self.data}: {self.classes} classes, {self.train_examples} meta-training images "
               f"(the training split); task: {self.ways}-way {self.shots}-shot"
               + (f"; budget {self.minutes:g} min" if self.minutes is not None else ""),
               f"rule of thumb: {self.rule} ({self.rule_reason})",
               f"measured: {top['method']} — {top['mean']:.2f} ± {top['ci95']:.2f} % at {m['ways']}-way "
               f"{m['shots']}-shot{'' if m['exact'] else ' (the nearest measured setting)'} on {top['data']} "
               f"({top['train_images']} training images, {top['minutes']:g} min of training; BENCHMARKS.md "
               f"\"{top['section']}\", row {top['label']!r})"]
        tied = [e for e in m["ranked"][1:] if e["mean"] + e["ci95"] >= top["mean"] - top["ci95"]]
        if tied:
            out.append("  within its CI: " + ", ".join(f"{e['method']} {e['mean']:.2f} ± {e['ci95']:.2f}"
                                                     for e in tied))
        if m["budget_note"]:
            out.append(f"  ({m['budget_note']})")
        out.append(("agree: " if self.agree else "disagree: ") + self.why)
        if self.trials:
            out.append(f"measured on {self.data} (same training episodes, same {self.trials[0]['n']} test "
                       "episodes, best first):")
            best = self.trials[0]
            for t in self.trials:
                tie = "" if t is best or t["mean"] + t["ci95"] < best["mean"] - best["ci95"] else " (within the best's CI)"
                out.append(f"  {t['method']:10s} {t['mean']:.2f} ± {t['ci95']:.2f} %  ({t['steps']} steps in "
                           f"{t['train_s']:.0f} s){tie}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict:
        return asdict(self)


def explain(rule: str, rule_reason: str, measured: dict, shots: int, train_examples: int) -> tuple:
    """``(agree, why)``: whether the rule's method is the measured best, and the reasons either way."""
    ranked = measured["ranked"]
    top = ranked[0]
    setting = f"{measured['ways']}-way {measured['shots']}-shot"
    if top["method"] == rule:
        why = f"{rule} is also the best measured method at {setting}"
        return True, why + _caveats(measured, train_examples)
    ours = next((e for e in ranked if e["method"] == rule), None)
    if ours is None:
        within = f" trained within {measured['minutes']:g} min" if measured.get("minutes") is not None else ""
        why = (f"the rule picks {rule} ({rule_reason}), but no {rule} run{within} was recorded at {setting}"
               + f"; the best recorded there is {top['method']}")
    else:
        gap = top["mean"] - ours["mean"]
        tied = ours["mean"] + ours["ci95"] >= top["mean"] - top["ci95"]
        why = (f"the rule picks {rule} ({rule_reason}); at {setting} {rule} measured {ours['mean']:.2f} ± "
               f"{ours['ci95']:.2f} % ({ours['minutes']:g} min) against {top['method']}'s {top['mean']:.2f} ± "
               f"{top['ci95']:.2f} % ({top['minutes']:g} min), {gap:.2f} points "
               + ("apart, within the CIs" if tied else "lower, outside the CIs"))
        if ours["minutes"] > top["minutes"] and not tied:
            why += f" although {rule} trained longer"
        elif ours["minutes"] < top["minutes"]:
            why += f"; {rule} trained for less time, so part of the gap may be budget"
    if rule == "relation":
        why += (f"; the rule's reason is a small meta-training set, and the recorded runs all had "
                f"{top['train_images']} training images, so they cannot test it")
    elif rule == "maml" and top["method"] != "maml":
        why += "; the rule assumes MAML's adaptation pays off with 5+ shots and enough data to meta-train it"
    return False, why + _caveats(measured, train_examples)


def _caveats(measured: dict, train_examples: int) -> str:
    top = measured["ranked"][0]
    notes = []
    if not measured["exact"]:
        notes.append("the measured setting is only the nearest one")
    ratio = train_examples / max(1, top["train_images"])
    if ratio < 0.5 or ratio > 2:
        notes.append(f"your data has {train_examples} meta-training images against the recorded runs' "
                     f"{top['train_images']} ({top['data']})")
    return ("; note: " + "; ".join(notes)) if notes else ""


def _data_summary(data, split: str, seed: int) -> tuple:
    """``(dataset, train, test, name)`` of ``data`` (a name/path or a ClassDataset) split as a run would."""
    from . import data as fsdata, tasks
    from .config import RunConfig
    from .data.dataset import ClassDataset
    from .run import split_dataset
    if isinstance(data, ClassDataset):
        ds, name = data, data.source or "the given data set"
    else:
        if tasks.is_family(str(data)):
            raise FewshotError(f"--data {data} is a task family; recommend compares methods on labelled classes")
        ds, name = fsdata.load(str(data)), str(data)
    cfg = RunConfig(data=name, split=split, split_seed=seed, val_fraction=0.0)
    cfg.check()
    train, _, test = split_dataset(ds, cfg)
    return ds, train, test, name


def recommend(data, ways: int, shots: int, minutes: Optional[float] = None, measure: bool = False,
              split: str = "auto", episodes: int = 200, seed: int = 0, out: Optional[str | Path] = None,
              candidates: Optional[Sequence[str]] = None, progress: bool = False) -> Recommendation:
    """The rule of thumb's method and the measured answer for ``ways``-way ``shots``-shot tasks on ``data``
    (a data set name or path, or a :class:`~fewshot.data.ClassDataset`), and where they disagree, why.

    ``minutes``: the training time available (only recorded runs within it count; with ``measure``, the
    total training time of the candidates, split evenly, default 3). ``measure``: also train the candidates
    (the rule's, the measured best's and protonet / relation / maml, or ``candidates``) on ``data``'s
    training split and rank them on ``episodes`` test episodes of its test split (:func:`measure_candidates`).

    Raises:
        FewshotError: ``ways`` or ``shots`` below 1, ``ways`` larger than the data's classes, a task family.
    """
    for flag, v in (("--ways", ways), ("--shots", shots)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FewshotError(f"{flag} must be at least 1, got {v!r}")
    if minutes is not None and not minutes > 0:
        raise FewshotError(f"--minutes must be more than 0, got {minutes}")
    ds, train, test, name = _data_summary(data, split, seed)
    if ways > len(ds):
        raise FewshotError(f"--ways {ways} is more than the {len(ds)} classes of --data {name}")
    rule, reason = rule_of_thumb(shots, train.num_images)
    measured = measured_answer(ways, shots, minutes)
    agree, why = explain(rule, reason, measured, shots, train.num_images)
    rec = Recommendation(name, ways, shots, len(ds), train.num_images, rule, reason, measured, agree, why, minutes)
    if measure:
        if test is None or len(test) < ways:
            raise FewshotError(f"--measure tests on the held-out classes of --data {name}, but --split {split} holds "
                               f"out {0 if test is None else len(test)}, fewer than --ways {ways}; choose a "
                               "--split that holds out more")
        cands = list(candidates) if candidates else list(dict.fromkeys([rule, measured["ranked"][0]["method"],
                                                                       "protonet", "relation", "maml"]))
        total = 60.0 * (minutes if minutes is not None else 3.0)
        rec.trials = measure_candidates(ds, name, split, ways, shots, cands, total / len(cands), episodes, seed,
                                        out, progress)
    return rec


def measure_candidates(ds, name: str, split: str, ways: int, shots: int, candidates: Sequence[str], seconds: float,
            episodes: int = 200, seed: int = 0, out: Optional[str | Path] = None, progress: bool = False) -> list:
    """Train every method of ``candidates`` for ``seconds`` on ``ways``-way ``shots``-shot tasks of the
    training split of ``ds`` (the same training episodes for all: same seed and shape, one task per step)
    and evaluate each on the same ``episodes`` fixed-seed test episodes; best first."""
    from . import methods
    from .config import RunConfig
    from .episodes import EpisodeSampler
    from .evaluate import evaluate
    from .run import default_queries, fit, split_dataset
    for m in candidates:
        methods.get(m)
    probe = RunConfig(data=name, split=split, split_seed=seed, val_fraction=0.0)
    train, _, test = split_dataset(ds, probe)
    queries = max(1, min(default_queries(train, shots), 15))
    test_queries = default_queries(test, shots)
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fewshot-recommend-"))
    trials = []
    for m in candidates:
        cfg = RunConfig(method=m, data=name, split=split, split_seed=seed, val_fraction=0.0, ways=ways,
                        shots=shots, queries=queries, batch=1, test_ways=ways, test_shots=shots,
                        test_queries=test_queries, seed=seed)
        cfg.train.episodes, cfg.train.time_limit_s, cfg.train.val_every = 10 ** 7, float(seconds), 0
        cfg.train.ckpt_every = 10 ** 7
        run = fit(cfg, root / m, progress=progress, dataset=ds, overwrite=True, check_test=True)
        test_sampler = EpisodeSampler(test, ways, shots, test_queries, device=run.device, seed=0)
        res = evaluate(run.method, test_sampler, episodes, precision=run.precision, progress=progress)
        trials.append({"method": m, "mean": res.mean, "ci95": res.ci95, "n": res.n,
                       "steps": run.train_result.steps, "train_s": run.train_result.train_time_s})
    return sorted(trials, key=lambda t: -t["mean"])
