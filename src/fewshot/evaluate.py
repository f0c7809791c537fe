"""The one evaluation protocol: fixed-seed test episodes, mean accuracy +- 1.96 sigma / sqrt(n).

Regression task families (``sampler.regression``, e.g. sine) report the mean squared error per task instead;
a family with its own metric (``sampler.metric``, e.g. the copy task's ``"bits"``: bits wrong per sequence,
lower is better) scores each task with ``sampler.score(prediction, episode)`` (and its loss column with
``sampler.task_loss`` when it has one); a family that scores the method itself in closed loop (RL returns,
imitation success) has ``sampler.evaluate_episode(method, episode)``, and says ``higher_is_better``.

Episodes are drawn in batches of :data:`EVAL_BATCH` tasks from a sampler reset to its seed, so every
method is scored on exactly the same episodes whatever its memory needs (``chunk`` only splits the
forward passes). Under torchrun every rank draws each batch and scores its share of the tasks, and the
scores are gathered in episode order (:mod:`fewshot.distributed`): the numbers of one process (test-time
augmentation and fine-tuning draw their random numbers per rank, so with them the jitter differs).
Batch norm runs in evaluation mode (running statistics: inductive) unless the method says otherwise
(``method.inference_mode``: MAML with transductive batch norm reports "transductive").

Classification episodes of image (or feature-map) classes are also scored by the raw-pixel nearest-neighbour
baseline (:func:`pixel_nn_accuracy`) on the very same episode tensors, so ``EvalResult.baseline`` says at once
whether the method learned anything beyond pixel matching.

Evaluation from cached features: a method whose prediction is a function of per-image features
(``method.scores_features``: protonet, simpleshot, hallucinate) is scored, when nothing about the episodes
depends on more than the image (no augmentation, unlabelled examples, class attributes, test-time
augmentation or fine-tuning) and it pays (the episodes hold more images than the data set), by embedding
every image of the sampler's data once (:func:`feature_cache`) and building each episode's logits from the
rows of its images (``Episode.support_index`` / ``query_index``) with ``method.predict_features``, in the
same calls over the same tasks. Episodes, scores, losses, the baseline and the CSV are those of the plain
path (features of one image do not depend on the others in its batch, up to float rounding).
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
from . import distributed
from .errors import FewshotError
from .methods.base import Method
from .precision import autocast
from .tasks.base import TaskFamily
from .finetune import find_finetune
from .parallel import tune_allocator
from .tta import TestTimeAugment

EVAL_BATCH = 25
DEFAULT_EPISODES = 1000
#: the most bytes (counted as fp32) of per-image features evaluation caches in its automatic mode
CACHE_BYTES = 1 << 30
#: environment variable: ``0`` turns the automatic evaluation from cached features off
CACHE_ENV = "FEWSHOT_EVAL_CACHE"


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
    finetune_steps: int = 0    #: test-time fine-tuning steps per task (0: none; see fewshot.finetune)
    finetune_lr: float = 0.0   #: test-time fine-tuning learning rate (0 when not fine-tuned)
    #: raw-pixel 1-nearest-neighbour accuracy (percent) on the same episodes; None when not scored
    baseline: Optional[float] = None
    baseline_ci95: Optional[float] = None   #: its 1.96 * std / sqrt(n), percent

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
                + (f", test-time augmentation x{self.tta}" if self.tta else "")
                + (f", fine-tuned {self.finetune_steps} steps at lr {self.finetune_lr:g}" if self.finetune_steps
                   else "") + ")")

    def baseline_line(self) -> str:
        """``baseline (pixel 1-NN): X ± Y %`` (empty when the baseline was not scored)."""
        if self.baseline is None:
            return ""
        return f"baseline (pixel 1-NN): {self.baseline:.2f} ± {self.baseline_ci95:.2f} %"

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


def pixel_nn_accuracy(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                      query_y: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy in percent ``[B]`` of raw-pixel 1-nearest neighbour: each query ``[B, M, ...]`` takes
    the label of its nearest support image ``[B, S, ...]`` (Euclidean distance on the preprocessed
    values, in fp32; a tie goes to the first support image)."""
    d = torch.cdist(query_x.flatten(2).float(), support_x.flatten(2).float())      # [B, M, S]
    pred = torch.gather(support_y, 1, d.argmin(-1))
    return (pred == query_y).float().mean(-1) * 100


def cache_refusal(method, sampler) -> Optional[str]:
    """Why episodes of ``sampler`` cannot be scored from cached per-image features of ``method``
    (see :func:`feature_cache`), in a few words; ``None`` when they can."""
    if isinstance(method, TestTimeAugment):
        return "test-time augmentation scores jittered copies of each episode's images"
    if find_finetune(method) is not None:
        return "test-time fine-tuning adapts the network to each task"
    if not isinstance(method, Method) or not method.scores_features:
        name = getattr(method, "name", "") or type(method).__name__
        return f"method {name} does not predict from per-image features (predict_features)"
    if method.inference_mode != "inductive":
        return f"method {method.name} classifies a task's queries together ({method.inference_mode})"
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
           for m in method.modules()):
        return "a batch-norm layer without running statistics normalises over each batch"
    if not isinstance(sampler, EpisodeSampler):
        return f"the episodes come from a {type(sampler).__name__}, not an EpisodeSampler over a ClassDataset"
    if sampler.transform is not None:
        return "the sampler transforms each episode's images (augmentation)"
    if sampler.unlabeled:
        return "the episodes carry unlabelled examples"
    if sampler.attributes is not None:
        return "the episodes carry class attributes"
    return None


def _auto_cache() -> bool:
    """Whether the automatic mode may cache (``$FEWSHOT_EVAL_CACHE``: ``0`` says no)."""
    v = os.environ.get(CACHE_ENV, "").strip().lower()
    if v in ("0", "false", "no", "off"):
        return False
    if v in ("", "1", "true", "yes", "on", "auto"):
        return True
    raise FewshotError(f"${CACHE_ENV} must be 0 (never cache evaluation features) or 1 (automatic), got {v!r}")


@torch.no_grad()
def feature_cache(method, sampler, episodes: int, cache: Optional[bool] = None, precision: str = "fp32",
                  chunk: Optional[int] = None, progress: bool = True, desc: str = "eval") -> Optional[torch.Tensor]:
    """The features ``[num_images, D]`` (``method.feature_vectors``) of every image of the sampler's data,
    when :func:`evaluate` scores ``episodes`` tasks from them; ``None`` for the plain path.

    ``cache``: ``None`` (automatic) caches when :func:`cache_refusal` finds nothing against it,
    ``$FEWSHOT_EVAL_CACHE`` is not ``0``, the tasks drawn (by this rank) hold more images than the data set,
    and the features fit in :data:`CACHE_BYTES` as fp32; ``False`` never caches; ``True`` always caches
    (however few the episodes and large the features) and raises a one-line :class:`FewshotError` saying why
    when it cannot. Call with ``method`` in evaluation mode. Images are embedded in the episode dtype, in
    passes of as many images as one plain forward pass holds, under the same autocast; under torchrun every
    rank embeds every image."""
    if cache is False or (cache is None and not _auto_cache()):
        return None
    why = cache_refusal(method, sampler)
    if why is not None:
        if cache:
            raise FewshotError(f"cache=True: cannot evaluate from cached features: {why}")
        return None
    n = sampler.dataset.num_images
    per_task = sampler.ways * (sampler.shots + sampler.queries)
    tasks = -(-episodes // EVAL_BATCH) * EVAL_BATCH / distributed.world()      # what this rank would embed
    if cache is None and tasks * per_task <= n:
        return None
    step = min(chunk or EVAL_BATCH, EVAL_BATCH) * per_task
    out = None
    bar = tqdm(total=n, desc=f"{desc}: embedding", disable=not (progress and distributed.is_main()), leave=False,
               unit="img")
    try:
        for start in range(0, n, step):
            end = min(start + step, n)
            with autocast(sampler.device, precision):
                z = method.feature_vectors(sampler.take(torch.arange(start, end, device=sampler.device)))
            if out is None:
                if cache is None and n * z[0].numel() * 4 > CACHE_BYTES:
                    return None
                out = z.new_empty(n, *z.shape[1:])
            out[start:end] = z
            bar.update(end - start)
    finally:
        bar.close()
    return out


@torch.no_grad()
def evaluate(method, sampler: EpisodeSampler, episodes: int = DEFAULT_EPISODES, precision: str = "fp32",
             chunk: Optional[int] = None, progress: bool = True, csv_path: str | os.PathLike | None = None,
             desc: str = "eval", baseline: bool = True, cache: Optional[bool] = None) -> EvalResult:
    """Accuracy of ``method`` on ``episodes`` tasks from ``sampler`` (reset to its seed first).

    For regression families the per-task number is the query MSE (``metric == "mse"``). ``baseline``: also
    score raw-pixel 1-NN (:func:`pixel_nn_accuracy`) on the same episodes when they are classification
    episodes of classes with image-shaped inputs ``[C, H, W]`` (not task families such as sine, RL or copy).
    ``cache``: score the episodes from per-image features embedded once (:func:`feature_cache`; ``None``:
    when it applies and pays, ``False``: never, ``True``: always, an error when it cannot)."""
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
    tuned = find_finetune(method)
    if tuned is not None:
        tuned.reset()
    baseline = baseline and not (regression or own_metric or isinstance(sampler, TaskFamily))
    device = sampler.device
    if device.type == "cpu":
        tune_allocator()
    accs: List[float] = []
    pixel: List[float] = []
    losses: List[float] = []
    index: List[int] = []         # the episode number of each score (ranks score shares of each batch)
    drawn = 0
    bar = tqdm(total=episodes, desc=desc, disable=not (progress and distributed.is_main()), leave=False, unit="ep")
    try:
        feats = feature_cache(method, sampler, episodes, cache, precision, chunk, progress, desc)
        while drawn < episodes:
            ep = sampler.sample(EVAL_BATCH)
            mine = distributed.share(EVAL_BATCH)    # every rank draws the batch and scores its share
            if distributed.active():
                ep = ep.tasks(mine)
            scored = len(accs)
            step = chunk or ep.batch
            for i in range(0, ep.batch, step):
                sl = slice(i, i + step)
                part = ep if step >= ep.batch else ep.tasks(sl)
                if hasattr(sampler, "evaluate_episode"):    # a family that scores the method itself (control)
                    with autocast(device, precision):
                        scores = sampler.evaluate_episode(method, part).float()
                    accs.extend(scores.tolist())
                    # the loss column falls as the score improves: minus a return, a distance as it is
                    higher = bool(getattr(sampler, "higher_is_better", False))
                    losses.extend((-scores if higher else scores).tolist())
                    continue
                with autocast(device, precision):
                    # a Method (or its TTA wrapper) declares predict_episode; any module with predict works too
                    if feats is not None:       # the rows of the cached features, in the same calls
                        logits = method.predict_features(feats[part.support_index], part.support_y,
                                                         feats[part.query_index], part.ways)
                    elif hasattr(method, "predict_episode"):
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
                if baseline and part.support_x.dim() == 5:
                    pixel.extend(pixel_nn_accuracy(part.support_x, part.support_y, part.query_x, qy).tolist())
            index.extend(range(drawn + mine.start, drawn + mine.start + len(accs) - scored))
            drawn += EVAL_BATCH
            bar.update(min(EVAL_BATCH, episodes - bar.n))
    finally:
        bar.close()
        method.train(was_training)
    if distributed.active():    # every rank's scores, in episode order: one process's numbers
        together = distributed.gather_in_order(index, accs, losses, *([pixel] if len(pixel) == len(accs) else []))
        accs, losses, pixel = together[0], together[1], (together[2] if len(together) > 2 else [])
    accs, losses = accs[:episodes], losses[:episodes]
    m, ci, sd = mean_ci(accs)
    pm, pci, _ = mean_ci(pixel[:episodes]) if pixel else (None, None, None)
    res = EvalResult(m, ci, sd, len(accs), sampler.ways, sampler.shots, sampler.queries, sampler.seed,
                     mode=getattr(method, "inference_mode", "inductive"), loss=sum(losses) / len(losses),
                     accuracies=accs,
                     metric=own_metric or ("mse" if regression else "accuracy"),
                     metric_label=getattr(sampler, "metric_label", "") if own_metric else "", tta=tta,
                     higher_is_better=bool(getattr(sampler, "higher_is_better", False)),
                     finetune_steps=tuned.steps if tuned is not None else 0,
                     finetune_lr=tuned.lr if tuned is not None else 0.0, baseline=pm, baseline_ci95=pci)
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
