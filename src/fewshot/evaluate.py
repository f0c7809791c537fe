"""The one evaluation protocol: fixed-seed test episodes, mean accuracy +- 1.96 sigma / sqrt(n).

Regression task families (``sampler.regression``, e.g. sine) report the mean squared error per task instead;
a family with its own metric (``sampler.metric``, e.g. the copy task's ``"bits"``: bits wrong per sequence,
lower is better) scores each task with ``sampler.score(prediction, episode)`` (and its loss column with
``sampler.task_loss`` when it has one); a family that scores the method itself in closed loop (RL returns,
imitation success) has ``sampler.evaluate_episode(method, episode)``, and says ``higher_is_better``.

Episodes are drawn in batches of :data:`EVAL_BATCH` tasks from a sampler reset to its seed, so every
method is scored on exactly the same episodes whatever its memory needs (``chunk`` only splits the
forward passes). Batch norm runs in evaluation mode (running statistics: inductive) unless the method says
otherwise (``method.inference_mode``: MAML with transductive batch norm reports "transductive").
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from .episodes import EpisodeSampler
from .errors import FewshotError
from .precision import autocast
from .tta import TestTimeAugment

EVAL_BATCH = 25
DEFAULT_EPISODES = 1000


@dataclass
class EvalResult:
    mean: float            #: mean accuracy in percent
    ci95: float            #: 1.96 * std / sqrt(n), percent
    std: float
    n: int
    ways: int
    shots: int
    queries: int
    seed: int
    mode: str = "inductive"
    loss: float = float("nan")
    accuracies: List[float] = field(default_factory=list, repr=False)
    metric: str = "accuracy"   #: accuracy (percent, higher is better), mse or a family's metric (lower is better)
    metric_label: str = ""     #: how a family's own metric reads, e.g. "bits wrong per sequence"
    tta: int = 0               #: test-time augmentation copies per image (0: none; see fewshot.tta)
    higher_is_better: bool = False   #: a family's own metric that grows with quality (an RL return)

    @property
    def score(self) -> float:
        """Higher is better: the accuracy (or a return), or minus the MSE (or a lower-is-better metric)."""
        return self.mean if self.metric == "accuracy" or self.higher_is_better else -self.mean

    def short(self) -> str:
        if self.metric == "mse":
            return f"MSE {self.mean:.4f} ± {self.ci95:.4f}"
        if self.metric != "accuracy":
            return f"{self.mean:.3f} ± {self.ci95:.3f} {self.metric_label or self.metric}"
        return f"{self.mean:.2f} ± {self.ci95:.2f} %"

    def __str__(self) -> str:
        if self.metric == "mse":
            return (f"{self.short()} (95% CI, {self.n} tasks, seed {self.seed}, {self.shots}-shot "
                    f"{self.queries}-query)")
        if self.metric != "accuracy":
            return f"{self.short()} (95% CI, {self.n} tasks, seed {self.seed})"
        return (f"{self.short()} (95% CI, {self.n} episodes, seed {self.seed}, "
                f"{self.ways}-way {self.shots}-shot {self.queries}-query, {self.mode}"
                + (f", test-time augmentation x{self.tta}" if self.tta else "") + ")")

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("accuracies")
        return d


def mean_ci(values: List[float]) -> tuple:
    """(mean, 1.96*std/sqrt(n), std) with the population std (ddof=0), as the literature reports."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / n)
    return m, 1.96 * sd / math.sqrt(n), sd


@torch.no_grad()
def evaluate(method, sampler: EpisodeSampler, episodes: int = DEFAULT_EPISODES, precision: str = "fp32",
             chunk: Optional[int] = None, progress: bool = True, csv_path: str | os.PathLike | None = None,
             desc: str = "eval") -> EvalResult:
    """Accuracy of ``method`` on ``episodes`` tasks from ``sampler`` (reset to its seed first).

    For regression families the per-task number is the query MSE (``metric == "mse"``)."""
    regression = bool(getattr(sampler, "regression", False))
    own_metric = getattr(sampler, "metric", None)
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise FewshotError(f"episodes must be at least 1, got {episodes!r}")
    if not own_metric and int(getattr(sampler, "queries", 1)) < 1:
        raise FewshotError("evaluation needs at least 1 query per class (queries is 0)")
    was_training = method.training
    method.eval()
    sampler.generator.manual_seed(sampler.seed)
    tta = method.copies if isinstance(method, TestTimeAugment) else 0
    if tta:
        method.reset()
    device = sampler.device
    accs: List[float] = []
    losses: List[float] = []
    bar = tqdm(total=episodes, desc=desc, disable=not progress, leave=False, unit="ep")
    try:
        while len(accs) < episodes:
            ep = sampler.sample(EVAL_BATCH)
            step = chunk or EVAL_BATCH
            for i in range(0, EVAL_BATCH, step):
                sl = slice(i, i + step)
                part = ep if step >= EVAL_BATCH else ep.tasks(sl)
                if hasattr(sampler, "evaluate_episode"):    # a family that scores the method itself (control)
                    with autocast(device, precision):
                        scores = sampler.evaluate_episode(method, part).float()
                    accs.extend(scores.tolist())
                    losses.extend((-scores).tolist())
                    continue
                with autocast(device, precision):
                    # a Method (or its TTA wrapper) declares predict_episode; any module with predict works too
                    if hasattr(method, "predict_episode"):
                        logits = method.predict_episode(part)
                    else:
                        logits = method.predict(part.support_x, part.support_y, part.query_x, part.ways)
                logits = logits.float()
                qy = ep.query_y[sl]
                if own_metric:
                    scores = sampler.score(logits, part)
                    accs.extend(scores.tolist())
                    losses.extend((sampler.task_loss(logits, part) if hasattr(sampler, "task_loss")
                                   else scores).tolist())
                    continue
                if regression:
                    mse = (logits - qy.float().view_as(logits)).pow(2).flatten(1).mean(1)
                    accs.extend(mse.tolist())
                    losses.extend(mse.tolist())
                    continue
                acc = (logits.argmax(-1) == qy).float().mean(-1)
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), qy.flatten(), reduction="none")
                accs.extend((acc * 100).tolist())
                losses.extend(nll.view(qy.shape).mean(-1).tolist())
            bar.update(min(EVAL_BATCH, episodes - bar.n))
    finally:
        bar.close()
        method.train(was_training)
    accs, losses = accs[:episodes], losses[:episodes]
    m, ci, sd = mean_ci(accs)
    res = EvalResult(m, ci, sd, len(accs), sampler.ways, sampler.shots, sampler.queries, sampler.seed,
                     mode=getattr(method, "inference_mode", "inductive"), loss=sum(losses) / len(losses),
                     accuracies=accs,
                     metric=own_metric or ("mse" if regression else "accuracy"),
                     metric_label=getattr(sampler, "metric_label", "") if own_metric else "", tta=tta,
                     higher_is_better=bool(getattr(sampler, "higher_is_better", False)))
    if csv_path is not None:
        write_episode_csv(res, losses, csv_path)
    return res


def write_episode_csv(res: EvalResult, losses: List[float], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["episode", res.metric, "loss", "ways", "shots", "queries", "seed"])
        for i, (a, l) in enumerate(zip(res.accuracies, losses)):
            w.writerow([i, f"{a:.4f}", f"{l:.6f}", res.ways, res.shots, res.queries, res.seed])
