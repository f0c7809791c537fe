"""Meta-learning without labels: training tasks built from unlabelled images (CACTUs, UMTRA).

``tasks`` in a run's config (``--tasks``) says where the training tasks come from:

* ``labels`` (default): N-way tasks of real classes (:class:`fewshot.episodes.EpisodeSampler`).
* ``cactus`` (Hsu, Levine & Finn 2019): embed every training image with an embedding learned here without
  labels, cut the embedding space into clusters several times (k-means on randomly rescaled embedding
  dimensions, or random hyperplanes), drop clusters with fewer than K + Q members, and draw an N-way task
  as N clusters of one partition, K + Q images of each, labels in random order (:class:`CactusSampler`).
* ``umtra`` (Khodadadeh, Bölöni & Shah 2019): N random images; the support of way n is image n (and
  K - 1 augmentations of it when K > 1), its queries are Q augmentations of it (:class:`UmtraSampler`).

Settings follow the kind after a colon, comma-separated: ``cactus:embedding=pca,k=200,partitions=20``,
``cactus:partition=hyperplanes,bits=8``, ``umtra``. See :class:`TaskSpec` for each and its default.

No label reaches training: both samplers receive only the images, in a canonical order (sorted by
content, :func:`image_pool`), so the labels or file order the images came with cannot change the tasks,
the embedding or the trained weights (tested). Evaluation is on real labelled classes as everywhere else.

Where the training images come from (:func:`unlabeled_source`): with ``--split none`` every image of
``--data`` trains, folder names ignored (a folder whose sub-folders mean nothing); a folder with no class
sub-folders (images directly in it, or anywhere below it) is read as an unlabelled collection
(:func:`unlabeled_folder`) and needs no split. Otherwise the data's classes are split as usual and the
training classes' labels are thrown away; validation and test classes keep theirs.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .augment import RandomAffine
from .data.dataset import ClassDataset, cached
from .data.images import Preprocess, as_size, is_image_file, to_float
from .episodes import Episode
from .errors import FewshotError

TASK_KINDS = ("labels", "cactus", "umtra")
EMBEDDINGS = ("contrastive", "pca", "pixels")
PARTITIONS = ("kmeans", "hyperplanes")
#: images per cluster at the paper's setting (k = 500 for Omniglot's 1100 x 20 training drawings); the
#: default k keeps it: k = min(500, images // 44), at least the ways
IMAGES_PER_CLUSTER = 44
MAX_K = 500


# ------------------------------------------------------------------------------------------ the spec
@dataclass
class TaskSpec:
    """Parsed ``--tasks`` value."""
    kind: str = "labels"
    #: cactus: the unsupervised embedding: contrastive (SimCLR-style Conv-4), pca or pixels
    embedding: str = "contrastive"
    #: cactus: clusters per partition (0: min(500, images // 44), at least the ways)
    k: int = 0
    #: cactus: number of partitions (the paper's 100 for Omniglot)
    partitions: int = 100
    #: cactus: kmeans (on randomly rescaled dimensions) or hyperplanes (random hyperplane codes)
    partition: str = "kmeans"
    #: cactus hyperplanes: hyperplanes per partition (0: ceil(log2 k), so about k cells)
    bits: int = 0
    #: cactus hyperplanes: leave out points closer to a hyperplane than this many standard deviations
    margin: float = 0.0
    #: cactus: PCA components (embedding=pca)
    dim: int = 64
    #: cactus contrastive encoder: training steps and images per step (two augmented views each)
    steps: int = 300
    batch: int = 128
    #: cactus contrastive encoder: temperature of the NT-Xent loss
    temperature: float = 0.5
    #: k-means: Lloyd iterations at most
    iters: int = 50

    def __str__(self) -> str:
        return format_tasks(self)


def parse_tasks(spec: str) -> TaskSpec:
    """``"cactus:k=200,embedding=pca"`` -> :class:`TaskSpec`; a one-line error naming ``--tasks``."""
    if not isinstance(spec, str) or not spec:
        raise FewshotError(f"tasks (--tasks) must be one of {', '.join(TASK_KINDS)}, got {spec!r}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in TASK_KINDS:
        raise FewshotError(f"unknown tasks {kind!r} (--tasks); choose from {', '.join(TASK_KINDS)}")
    out = TaskSpec(kind=kind)
    if rest and kind != "cactus":
        raise FewshotError(f"--tasks {kind} takes no settings, got {spec!r}")
    types = {f.name: type(f.default) for f in fields(TaskSpec)}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in types or key == "kind":
            known = ", ".join(f.name for f in fields(TaskSpec) if f.name != "kind")
            raise FewshotError(f"--tasks {spec!r}: expected KEY=VALUE with KEY one of {known}, got {item!r}")
        try:
            value = types[key](val.strip())
        except ValueError:
            raise FewshotError(f"--tasks {spec!r}: {key} must be {types[key].__name__}, got {val!r}") from None
        setattr(out, key, value)
    choices = {"embedding": EMBEDDINGS, "partition": PARTITIONS}
    for key, allowed in choices.items():
        if getattr(out, key) not in allowed:
            raise FewshotError(f"--tasks {spec!r}: {key} must be one of {', '.join(allowed)}")
    for key in ("partitions", "dim", "steps", "batch", "iters"):
        if getattr(out, key) < 1:
            raise FewshotError(f"--tasks {spec!r}: {key} must be at least 1")
    for key in ("k", "bits"):
        if getattr(out, key) < 0:
            raise FewshotError(f"--tasks {spec!r}: {key} must be at least 0 (0: from the data)")
    if out.margin < 0 or not out.temperature > 0:
        raise FewshotError(f"--tasks {spec!r}: margin must be >= 0 and temperature > 0")
    return out


def format_tasks(t: TaskSpec) -> str:
    """The ``--tasks`` string of ``t`` (settings that differ from the defaults only)."""
    if t.kind != "cactus":
        return t.kind
    d = TaskSpec(kind="cactus")
    parts = [f"{f.name}={getattr(t, f.name)}" for f in fields(t) if f.name != "kind" and getattr(t, f.name)
             != getattr(d, f.name)]
    return "cactus" + (":" + ",".join(parts) if parts else "")


def label_free(cfg) -> bool:
    """Whether the run's training tasks are built without labels (``tasks`` other than ``labels``)."""
    return parse_tasks(getattr(cfg, "tasks", "labels")).kind != "labels"


# ------------------------------------------------------------------------------------------ data
def _walk_images(root: Path) -> list:
    """Every visible image file under ``root`` (any depth), as ``(path, size, mtime_ns)``, sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not is_image_file(name):
                continue
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p, st.st_size, st.st_mtime_ns))
    out.sort(key=lambda t: str(t[0]))
    return out


def has_class_folders(root: Path) -> bool:
    """Whether ``root`` holds visible sub-folders with images directly in them (the class layout)."""
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            if any(is_image_file(q.name) and not q.name.startswith(".") for q in p.iterdir() if q.is_file()):
                return True
    return False


def unlabeled_folder(root: str | os.PathLike, size=28, channels: int = 1, invert: bool = False,
                     cache=None) -> ClassDataset:
    """Every image under ``root`` (flat or nested, folder names ignored) as one unlabelled collection: a
    :class:`ClassDataset` with a single class ``"unlabelled"``.

    Raises:
        FewshotError: ``root`` is not a folder or holds no images.
    """
    from .data.folder import load_files
    root = Path(root)
    if not root.is_dir():
        raise FewshotError(f"--data {root} is not a folder of images")
    if channels not in (1, 3):
        raise FewshotError(f"channels must be 1 or 3, got {channels}")
    files = _walk_images(root)
    if not files:
        raise FewshotError(f"no images in {root} or its sub-folders")
    pre = Preprocess(size=as_size(size), channels=int(channels), invert=bool(invert))

    def build() -> ClassDataset:
        data = load_files([p for p, _, _ in files], pre)
        return ClassDataset(data, [len(files)], ["unlabelled"], None, pre, source=f"unlabelled images in {root}")

    import hashlib
    h = hashlib.sha256()
    for p, s, m in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{s}\0{m}\n".encode())
    return cached([root], {"pre": pre.to_dict(), "files": h.hexdigest()}, build, tag="unlabeled", cache=cache)


def unlabeled_source(cfg) -> bool:
    """Whether ``cfg.data`` is to be read as an unlabelled collection of images (:func:`unlabeled_folder`):
    label-free tasks, no ``labels``/``label_pattern``, and ``--data`` a folder of images without class
    sub-folders, or any image folder with ``--split none`` (its folder names mean nothing)."""
    if not label_free(cfg) or cfg.labels is not None or cfg.label_pattern is not None:
        return False
    from . import data as fsdata
    p = Path(cfg.data)
    if cfg.data in fsdata.BUILTIN or not p.is_dir() or fsdata.kind_of(cfg.data) != "folder":
        return False
    return cfg.split == "none" or not has_class_folders(p)


def load_unlabeled(cfg) -> ClassDataset:
    """The run's unlabelled images (see :func:`unlabeled_source`); the split is resolved to ``none`` (there
    are no classes to hold out), any other split is an error naming ``--split``."""
    if cfg.split not in ("auto", "none"):
        raise FewshotError(f"--split {cfg.split} holds out classes, but --data {cfg.data} is a folder of "
                           "unlabelled images; use --split none and evaluate with `fewshot eval RUN --data "
                           "LABELLED_DATA`")
    cfg.split = "none"
    return unlabeled_folder(cfg.data, size=cfg.size, channels=cfg.channels or 1, invert=bool(cfg.invert))


def split(ds: ClassDataset, cfg) -> tuple:
    """(train, val, test) for label-free tasks: with ``split: none`` every image trains and there is no
    validation split (no labels to validate with); otherwise the usual class split
    (:func:`fewshot.run.split_dataset`), whose training part is used without its labels."""
    from .run import split_dataset
    if cfg.split == "none":
        return ds, None, None
    return split_dataset(ds, cfg)


def image_pool(ds: ClassDataset) -> torch.Tensor:
    """Every image of ``ds`` ``[n, C, H, W]`` with its labels thrown away, in a canonical order: sorted by
    a fixed random projection of the pixels, so the order depends on the images alone (not on the classes
    or files they came from); identical images are interchangeable."""
    x = ds.data.reshape(ds.num_images, -1)
    g = torch.Generator().manual_seed(0x5EED)
    w = torch.rand(x.shape[1], generator=g, dtype=torch.float64)
    keys = torch.cat([x[i:i + 4096].to(torch.float64) @ w for i in range(0, x.shape[0], 4096)])
    return ds.data[torch.argsort(keys, stable=True)]


# ------------------------------------------------------------------------------------------ embeddings
class Embedding:
    """A learned map from images (floats in [0, 1], ``[n, C, H, W]``) to vectors ``[n, d]``."""

    def __init__(self, kind: str, module: Optional[nn.Module] = None, mean: Optional[torch.Tensor] = None,
                 components: Optional[torch.Tensor] = None, normalize: bool = False):
        self.kind, self.module, self.mean, self.components, self.normalize = kind, module, mean, components, \
            normalize

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Embed ``x`` (uint8 images, or floats in [0, 1]) ``chunk`` images at a time."""
        outs = []
        for i in range(0, x.shape[0], chunk):
            xi = to_float(x[i:i + chunk])
            if self.kind == "contrastive":
                self.module.eval()
                z = self.module(xi.to(next(self.module.parameters()).device)).float().flatten(1)
            else:
                z = xi.reshape(xi.shape[0], -1).float()
                if self.kind == "pca":
                    z = (z - self.mean) @ self.components
            outs.append(F.normalize(z, dim=1) if self.normalize else z)
        return torch.cat(outs)


#: the PCA floor is fitted on at most this many images
PCA_FIT_IMAGES = 10000
#: the contrastive encoder's views: stronger affine jitter than the training augmentation
CONTRASTIVE_VIEW = RandomAffine(degrees=20.0, scale=(0.8, 1.2), shear=15.0, translate=0.15)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over 2B views: each view's positive is the other
    view of its image, the other 2B - 2 views are its negatives."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def learn_embedding(pool: torch.Tensor, spec: TaskSpec, seed: int = 0, device="cpu", precision: str = "fp32",
                    log: Optional[Callable[[str], None]] = None) -> Embedding:
    """Learn ``spec.embedding`` from the unlabelled ``pool`` (uint8 or float ``[n, C, H, W]``), seeded.

    * ``pixels``: the flattened pixels (the floor).
    * ``pca``: the top ``spec.dim`` principal components of the pixels (fitted on at most
      :data:`PCA_FIT_IMAGES` images, a seeded subset of larger pools).
    * ``contrastive``: a Conv-4 encoder (64 channels) with a 2-layer projection head trained with the NT-Xent
      loss on two affine-jittered views of ``spec.batch`` images per step for ``spec.steps`` steps (Adam
      1e-3); the embedding is the encoder's output (before the head), L2-normalised, as SimCLR uses it.
    """
    from .models import Conv4
    from .precision import autocast, grad_scaler
    if spec.embedding == "pixels":
        return Embedding("pixels")
    if spec.embedding == "pca":
        pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:PCA_FIT_IMAGES]
        flat = to_float(pool[pick.sort().values]).reshape(len(pick), -1)
        mean = flat.mean(0)
        q = min(spec.dim, *flat.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(flat - mean, q=q, niter=4)
        return Embedding("pca", mean=mean, components=v[:, :q])
    device = torch.device(device)
    if min(pool.shape[2:]) < 16:
        raise FewshotError(f"the contrastive embedding's Conv-4 needs images of at least 16x16, got "
                           f"{tuple(pool.shape[2:])}; use --tasks cactus:embedding=pca")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = Conv4(pool.shape[1], 64).to(device)
        with torch.no_grad():
            d = enc(torch.zeros(2, *pool.shape[1:], device=device)).flatten(1).shape[1]
        head = nn.Sequential(nn.Linear(d, 256), nn.ReLU(inplace=True), nn.Linear(256, 64)).to(device)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    scaler = grad_scaler(device, precision)
    g = torch.Generator(device=device).manual_seed(seed)
    xd = pool.to(device)                               # uint8 on the device; a batch is scaled when drawn
    n, b = xd.shape[0], min(spec.batch, xd.shape[0])
    t0 = time.time()
    enc.train()
    for step in range(spec.steps):
        idx = torch.randperm(n, generator=g, device=device)[:b]
        views = CONTRASTIVE_VIEW(to_float(xd[idx]).unsqueeze(0).expand(2, -1, -1, -1, -1).contiguous(), g)
        with autocast(device, precision):
            z = head(enc(views.reshape(2 * b, *xd.shape[1:])).flatten(1))
        loss = nt_xent(z[:b], z[b:], spec.temperature)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:          # fp16: dynamic loss scaling
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if log is not None and (step + 1) % max(1, spec.steps // 5) == 0:
            log(f"contrastive embedding: step {step + 1}/{spec.steps}, NT-Xent {loss.item():.3f}, "
                f"{time.time() - t0:.0f} s")
    enc.eval()
    return Embedding("contrastive", module=enc.cpu(), normalize=True)


def pool_digest(pool: torch.Tensor) -> str:
    """A digest of the pool's pixels (what every cached product of the pool depends on)."""
    import hashlib
    return hashlib.sha256(pool.contiguous().cpu().numpy().tobytes()).hexdigest()[:20]


def _embedding_key(pool: torch.Tensor, spec: TaskSpec, seed: int, precision: str) -> str:
    import hashlib
    what = {"pixels": (), "pca": (spec.dim,), "contrastive": (spec.steps, spec.batch, spec.temperature, precision)}
    h = hashlib.sha256(f"{pool_digest(pool)}|{spec.embedding}|{what[spec.embedding]}|{seed}|v1".encode())
    return h.hexdigest()[:20]


def cached_embedding(pool: torch.Tensor, spec: TaskSpec, seed: int = 0, device="cpu", precision: str = "fp32",
                     log: Optional[Callable[[str], None]] = None, cache: bool = True) -> Embedding:
    """:func:`learn_embedding`, kept in the fewshot cache folder (``$FEWSHOT_CACHE``, else
    ``~/.cache/fewshot``) under a key of the pool's pixels, the embedding settings, the seed and the
    precision, so runs that differ in anything else (ways, k, the method) learn it once."""
    from .data.dataset import cache_dir
    path = cache_dir() / f"embedding-{_embedding_key(pool, spec, seed, precision)}.pt" if cache else None
    if path is not None and path.is_file():
        try:
            d = torch.load(path, weights_only=True)
            if d["kind"] == "contrastive":
                from .models import Conv4
                enc = Conv4(pool.shape[1], 64)
                enc.load_state_dict(d["state"])
                return Embedding("contrastive", module=enc.eval(), normalize=True)
            return Embedding(d["kind"], mean=d.get("mean"), components=d.get("components"))
        except Exception:
            pass                                      # a damaged or stale cache file is rebuilt
    emb = learn_embedding(pool, spec, seed=seed, device=device, precision=precision, log=log)
    if path is not None:
        d = {"kind": emb.kind, "state": emb.module.state_dict() if emb.module is not None else None,
             "mean": emb.mean, "components": emb.components}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            torch.save(d, tmp)
            os.replace(tmp, path)
        except OSError:
            pass
    return emb


# ------------------------------------------------------------------------------------------ partitions
def kmeans(z: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Cluster index of every row of ``z`` ``[n, d]`` after k-means++ seeding and at most ``iters`` Lloyd
    iterations (stops when no assignment changes); an empty cluster is re-seeded at the farthest point."""
    n = z.shape[0]
    z = z.float()
    sq = z.pow(2).sum(1)
    centers = torch.empty(k, z.shape[1])
    centers[0] = z[torch.randint(n, (1,), generator=generator)]
    d2 = (sq - 2 * z @ centers[0] + centers[0].pow(2).sum()).clamp_min(0)
    for j in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        centers[j] = z[torch.multinomial(p, 1, generator=generator)]
        d2 = torch.minimum(d2, (sq - 2 * z @ centers[j] + centers[j].pow(2).sum()).clamp_min(0))
    assign = None
    for _ in range(iters):
        dist = sq[:, None] - 2 * z @ centers.t() + centers.pow(2).sum(1)[None]
        new = dist.argmin(1)
        if assign is not None and bool((new == assign).all()):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, z)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            far = dist.min(1).values.topk(int(empty.sum())).indices
            centers[empty] = z[far]
    return assign


def hyperplane_cells(z: torch.Tensor, bits: int, margin: float, generator: torch.Generator) -> torch.Tensor:
    """Cell of every row of ``z`` among ``bits`` random hyperplanes (normals ~ N(0, I), each through a random
    data point): the binary code of the sides; points closer than ``margin`` standard deviations of the
    projections to any hyperplane get -1 (left out)."""
    n, d = z.shape
    w = torch.randn(d, bits, generator=generator)
    proj = z.float() @ w
    through = proj[torch.randint(n, (bits,), generator=generator), torch.arange(bits)]
    side = proj - through
    code = ((side > 0).long() * (2 ** torch.arange(bits))).sum(1)
    if margin > 0:
        close = (side.abs() < margin * proj.std(0).clamp_min(1e-12)).any(1)
        code[close] = -1
    return code


def default_k(n: int, ways: int) -> int:
    """Clusters per partition from the data: min(500, n // 44) (the paper's 44 images per cluster), at least
    ``ways``."""
    return max(int(ways), min(MAX_K, n // IMAGES_PER_CLUSTER))


def partitions(z: torch.Tensor, spec: TaskSpec, ways: int, need: int, seed: int = 0,
               log: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """``[P, n]`` cluster labels of the embedded pool ``z`` (one row per partition, -1 for an image left out
    of that partition: its cluster has fewer than ``need`` = K + Q members, or it lies within the hyperplane
    margin). k-means partition 0 clusters ``z`` itself, partition p > 0 clusters ``z`` with every dimension
    multiplied by its own U(0, 1) weight (CACTUs' rescaled embeddings). Partitions with fewer than ``ways``
    usable clusters are dropped; none left is an error."""
    n = z.shape[0]
    g = torch.Generator().manual_seed(seed)
    k = spec.k or default_k(n, ways)
    bits = spec.bits or max(1, math.ceil(math.log2(max(k, 2))))
    rows, t0 = [], time.time()
    for p in range(spec.partitions):
        if spec.partition == "kmeans":
            zp = z if p == 0 else z * torch.rand(z.shape[1], generator=g)
            lab = kmeans(zp, k, g, spec.iters)
        else:
            lab = hyperplane_cells(z, bits, spec.margin, g)
        valid = lab >= 0
        uniq, inv, counts = torch.unique(lab[valid], return_inverse=True, return_counts=True)
        keep = counts >= need
        if int(keep.sum()) < ways:
            continue
        new_id = torch.cumsum(keep.long(), 0) - 1
        row = torch.full((n,), -1, dtype=torch.long)
        row[valid] = torch.where(keep[inv], new_id[inv], torch.full_like(inv, -1))
        rows.append(row)
    if log is not None:
        log(f"cactus: {len(rows)} of {spec.partitions} {spec.partition} partitions kept "
            f"({'k = ' + str(k) if spec.partition == 'kmeans' else str(bits) + ' hyperplanes'}, clusters of at "
            f"least {need} images), {time.time() - t0:.0f} s")
    if not rows:
        raise FewshotError(f"no {spec.partition} partition of the {n} training images has {ways} clusters of at "
                           f"least {need} images (K + Q); use fewer --ways/--shots/--queries or a smaller k in "
                           "--tasks cactus:k=N")
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------ samplers
class _PoolSampler:
    """What the two label-free samplers share: the pool on the device (scaled to floats once), the seeded
    generator, the episode shape and the :class:`~fewshot.episodes.EpisodeSampler` interface."""

    def __init__(self, pool: torch.Tensor, ways: int, shots: int, queries: int, batch: int = 1, device="cpu",
                 seed: int = 0, dtype=torch.float32, transform=None, float_cache_bytes: int = 1 << 30):
        for k, v in (("ways", ways), ("shots", shots), ("batch", batch), ("queries", queries)):
            if int(v) < 1:
                raise FewshotError(f"{k} must be at least 1, got {v}")
        self.ways, self.shots, self.queries, self.batch = int(ways), int(shots), int(queries), int(batch)
        self.device = torch.device(device)
        self.dtype, self.transform, self.seed = dtype, transform, seed
        self.pool = pool
        self.image_shape = tuple(pool.shape[1:])
        data = pool.to(self.device)
        n_bytes = data.numel() * (torch.finfo(dtype).bits // 8 if dtype is not None else 1)
        # scaled to floats once when that fits in float_cache_bytes (as EpisodeSampler does), else per episode
        self.prescaled = dtype is not None and (n_bytes <= float_cache_bytes or data.is_floating_point())
        self.data = to_float(data, dtype) if self.prescaled else data
        self.flat = self.data.reshape(self.data.shape[0], -1)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    @property
    def num_images(self) -> int:
        return self.pool.shape[0]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        B = idx.shape[0]
        x = self.flat.index_select(0, idx.reshape(-1))
        if self.dtype is not None and not self.prescaled:
            x = to_float(x, self.dtype)
        return x.view(B, -1, *self.image_shape)

    def _episode(self, sx, qx) -> Episode:
        B, N, K, Q = sx.shape[0], self.ways, self.shots, self.queries
        labels = torch.arange(N, device=self.device)
        return Episode(sx, labels.repeat_interleave(K).expand(B, N * K), qx,
                       labels.repeat_interleave(Q).expand(B, N * Q), N, K, Q)

    def __iter__(self):
        while True:
            yield self.sample()


class CactusSampler(_PoolSampler):
    """CACTUs tasks: N clusters of one partition, K + Q images of each, labels in random order.

    The partitions (embedding, then clustering) are built by :meth:`prepare`, on the first :meth:`sample`
    unless called before; they are part of :meth:`state_dict`, so a resumed run continues on the very same
    partitions without learning the embedding again.

    Args:
        pool: the unlabelled training images (:func:`image_pool`).
        spec: the ``--tasks cactus:...`` settings.
        precision: autocast precision for the contrastive encoder ("fp32", "bf16" or "fp16").
        log: where progress lines go (``None``: silent).
        cache: keep the partitions in the fewshot cache folder (see :meth:`prepare`).
        The rest as for :class:`~fewshot.episodes.EpisodeSampler` (``transform`` jitters every episode image).
    """

    def __init__(self, pool: torch.Tensor, spec: TaskSpec, ways: int, shots: int, queries: int, batch: int = 1,
                 device="cpu", seed: int = 0, dtype=torch.float32, transform=None, precision: str = "fp32",
                 log: Optional[Callable[[str], None]] = None, cache: bool = True):
        super().__init__(pool, ways, shots, queries, batch, device, seed, dtype, transform)
        self.spec, self.precision, self.log, self.cache = spec, precision, log, cache
        n, need = self.num_images, self.shots + self.queries
        self.k = spec.k or default_k(n, self.ways)
        if spec.k and spec.k < self.ways:
            raise FewshotError(f"--tasks cactus:k={spec.k} makes fewer clusters than the {self.ways} ways a task needs")
        if spec.partition == "kmeans" and n < self.k * need:
            raise FewshotError(f"{n} training images are too few for cactus tasks: k = {self.k} clusters of "
                               f"{self.shots} shots + {self.queries} queries need at least {self.k * need} images "
                               f"(add images, or lower k, --ways, --shots or --queries)")
        if spec.partition == "hyperplanes" and n < self.ways * need:
            raise FewshotError(f"{n} training images are too few for {self.ways}-way cactus tasks of "
                               f"{need} images per way")
        self.labels: Optional[torch.Tensor] = None
        self.embedding: Optional[Embedding] = None
        self.build_seconds = 0.0

    def cache_key(self) -> str:
        """What the partitions depend on: the pool's pixels, the settings, the seed, the ways, K + Q and the
        encoder's precision."""
        import hashlib
        h = hashlib.sha256(f"{pool_digest(self.pool)}|{format_tasks(self.spec)}|{self.seed}|{self.ways}|"
                           f"{self.shots + self.queries}|{self.precision}|v1".encode())
        return h.hexdigest()[:20]

    def prepare(self) -> "CactusSampler":
        """Learn the embedding and cut the partitions (once). With ``cache`` (the default) the embedding
        (:func:`cached_embedding`) and the partitions are kept in the fewshot cache folder (``$FEWSHOT_CACHE``, else ``~/.cache/fewshot``) under
        :meth:`cache_key`, so another run on the same images and settings skips this step."""
        if self.labels is not None:
            return self
        from .data.dataset import cache_dir
        path = cache_dir() / f"cactus-{self.cache_key()}.pt" if self.cache else None
        if path is not None and path.is_file():
            try:
                self._set_labels(torch.load(path, weights_only=True)["partitions"])
                if self.log is not None:
                    self.log(f"cactus: partitions read from {path}")
                return self
            except Exception:
                pass                                  # a damaged cache file is rebuilt
        t0 = time.time()
        self.embedding = cached_embedding(self.pool, self.spec, seed=self.seed, device=self.device,
                                          precision=self.precision, log=self.log, cache=self.cache)
        z = self.embedding(self.pool).cpu()
        self._set_labels(partitions(z, self.spec, self.ways, self.shots + self.queries, seed=self.seed,
                                    log=self.log))
        self.build_seconds = time.time() - t0
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                torch.save({"partitions": self.labels}, tmp)
                os.replace(tmp, path)
            except OSError:
                pass                                  # an unwritable cache only costs the rebuild
        return self

    def _set_labels(self, labels: torch.Tensor) -> None:
        """Index the ``[P, n]`` partition labels for sampling: every usable cluster of every partition gets a
        row of one table (its partition, its first member in the member order, its size)."""
        self.labels = labels.to(torch.int16 if int(labels.max()) < 2 ** 15 else torch.int32)
        P, n = labels.shape
        lab = labels.long()
        per = (lab.max(1).values + 1)                                   # clusters in each partition
        start = torch.cat([torch.zeros(1, dtype=torch.long), per.cumsum(0)[:-1]])
        gid = torch.where(lab >= 0, lab + start[:, None], torch.full_like(lab, -1)).reshape(-1)
        img = torch.arange(n).repeat(P)
        keep = gid >= 0
        gid, img = gid[keep], img[keep]
        order = torch.argsort(gid, stable=True)
        sizes = torch.bincount(gid, minlength=int(per.sum()))
        dev = self.device
        self.members = img[order].to(dev)                               # images, cluster by cluster
        self.sizes = sizes.to(dev)
        self.first = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]]).to(dev)
        self.cluster_part = torch.repeat_interleave(torch.arange(P), per).to(dev)
        self.max_size = int(sizes.max())
        self.n_partitions = P

    def state_dict(self) -> dict:
        self.prepare()
        return {**super().state_dict(), "partitions": self.labels.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._set_labels(state["partitions"])

    def sample(self, batch: Optional[int] = None) -> Episode:
        self.prepare()
        B, N, M, g, dev = batch or self.batch, self.ways, self.shots + self.queries, self.generator, self.device
        part = torch.randint(self.n_partitions, (B,), generator=g, device=dev)
        keys = torch.rand(B, len(self.sizes), generator=g, device=dev)
        keys = keys.masked_fill(self.cluster_part[None] != part[:, None], -1.0)
        cls = keys.topk(N, dim=1, sorted=True).indices                  # random keys: labels in random order
        within = torch.rand(B, N, self.max_size, generator=g, device=dev)
        valid = torch.arange(self.max_size, device=dev) < self.sizes[cls].unsqueeze(-1)
        pos = within.masked_fill(~valid, 2.0).argsort(dim=2)[:, :, :M]
        idx = self.members[self.first[cls].unsqueeze(-1) + pos]         # [B, N, K+Q] pool indices
        sx, qx = self._gather(idx[:, :, :self.shots]), self._gather(idx[:, :, self.shots:])
        if self.transform is not None:
            sx, qx = self.transform(sx, g), self.transform(qx, g)
        return self._episode(sx, qx)

    def __repr__(self) -> str:
        return (f"CactusSampler({self.ways}-way {self.shots}-shot {self.queries}-query, {self.num_images} images, "
                f"{self.spec}, seed {self.seed})")


#: UMTRA's augmentation when the run sets none: affine jitter a little stronger than the training default
UMTRA_AUGMENT = RandomAffine(degrees=15.0, scale=(0.85, 1.15), shear=10.0, translate=0.15)


class UmtraSampler(_PoolSampler):
    """UMTRA tasks: N distinct random images; way n's support is image n (plus K - 1 augmentations of it
    when K > 1), its Q queries are augmentations of it. ``augment`` (the run's transform, else
    :data:`UMTRA_AUGMENT`) makes the augmentations."""

    def __init__(self, pool: torch.Tensor, ways: int, shots: int, queries: int, batch: int = 1, device="cpu",
                 seed: int = 0, dtype=torch.float32, augment=None):
        super().__init__(pool, ways, shots, queries, batch, device, seed, dtype, None)
        if dtype is None:
            raise FewshotError("umtra tasks augment images, so they need a float dtype")
        if self.num_images < self.ways:
            raise FewshotError(f"{self.num_images} training images are too few for {self.ways}-way umtra tasks")
        self.augment = augment or UMTRA_AUGMENT

    def sample(self, batch: Optional[int] = None) -> Episode:
        B, N, K, Q, g, dev = batch or self.batch, self.ways, self.shots, self.queries, self.generator, self.device
        keys = torch.rand(B, self.num_images, generator=g, device=dev)
        pick = keys.topk(N, dim=1, sorted=True).indices                 # [B, N] distinct images
        base = self._gather(pick)                                       # [B, N, C, H, W]
        if K > 1:
            extra = self.augment(base.repeat_interleave(K - 1, dim=1), g).view(B, N, K - 1, *self.image_shape)
            sx = torch.cat([base.unsqueeze(2), extra], 2).reshape(B, N * K, *self.image_shape)
        else:
            sx = base
        qx = self.augment(base.repeat_interleave(Q, dim=1), g)
        return self._episode(sx, qx)

    def __repr__(self) -> str:
        return (f"UmtraSampler({self.ways}-way {self.shots}-shot {self.queries}-query, {self.num_images} images, "
                f"seed {self.seed})")


def task_sampler(cfg, train_ds: ClassDataset, device, prepare: bool = True, log=None):
    """The training sampler of a label-free run: :class:`CactusSampler` or :class:`UmtraSampler` over the
    images of ``train_ds`` (labels thrown away, :func:`image_pool`). ``prepare``: build the CACTUs
    partitions now (a resumed run takes them from its checkpoint instead)."""
    from .augment import build_transform
    spec = parse_tasks(cfg.tasks)
    if cfg.unlabeled or cfg.distractors:
        raise FewshotError(f"--tasks {cfg.tasks} builds its own tasks; --unlabeled/--distractors apply to "
                           "tasks of labelled classes only")
    pool = image_pool(train_ds)
    transform = build_transform(cfg.augment)
    if log is None:
        log = lambda s: print(f"fewshot: {s}", file=sys.stderr, flush=True)   # noqa: E731
    try:
        if spec.kind == "umtra":
            return UmtraSampler(pool, cfg.ways, cfg.shots, cfg.queries, batch=cfg.batch, device=device,
                                seed=cfg.seed, augment=transform)
        s = CactusSampler(pool, spec, cfg.ways, cfg.shots, cfg.queries, batch=cfg.batch, device=device,
                          seed=cfg.seed, transform=transform, precision=cfg.precision, log=log)
    except FewshotError as e:
        raise FewshotError(f"--tasks {cfg.tasks}: {e}") from None
    if prepare:
        try:
            s.prepare()
        except FewshotError as e:
            raise FewshotError(f"--tasks {cfg.tasks}: {e}") from None
    return s


# ------------------------------------------------------------------------------------------ analysis
@torch.no_grad()
def embedding_accuracy(embedding: Embedding, ds: ClassDataset, ways: int, shots: int, queries: int = 15,
                       episodes: int = 1000, seed: int = 0) -> tuple:
    """The embedding's own few-shot accuracy on labelled classes ``ds``: each query takes the class of the
    nearest support mean (the nearest support image at 1 shot) in the embedding, Euclidean, over the same
    fixed-seed episodes :func:`fewshot.evaluate` draws. Returns ``(mean %, 95% CI %, n)``."""
    from .episodes import EpisodeSampler
    from .evaluate import EVAL_BATCH
    s = EpisodeSampler(ds, ways, shots, queries, seed=seed)
    accs = []
    left = episodes
    while left > 0:
        ep = s.sample(EVAL_BATCH).tasks(slice(0, min(EVAL_BATCH, left)))    # the episodes evaluate() draws
        B = ep.batch
        zs = embedding(ep.support_x.reshape(-1, *ep.support_x.shape[2:])).view(B, ways, shots, -1).mean(2)
        zq = embedding(ep.query_x.reshape(-1, *ep.query_x.shape[2:])).view(B, ways * queries, -1)
        pred = torch.cdist(zq, zs).argmin(-1)
        accs.append((pred == ep.query_y).float().mean(1) * 100)
        left -= B
    a = torch.cat(accs)
    return float(a.mean()), float(1.96 * a.std(unbiased=True) / math.sqrt(len(a))) if len(a) > 1 else 0.0, len(a)
