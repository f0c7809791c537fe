"""Shared fixtures: a tiny synthetic ClassDataset, fake Omniglot zips in the published layout, an image
folder, a fake all_runs.zip, and a private cache folder so that no test touches ~/.cache."""
from __future__ import annotations

import random
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from fewshot.data.dataset import ClassDataset

#: Real data kept next to the repository (read-only); tests using it skip when it is absent.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def need_shared(*parts: str) -> Path:
    """The path ``SHARED/parts...``, or skip the test with a clear message when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (it lives in ../shared/data next to the repo)")
    return p


# ------------------------------------------------------------------------------------------ environment
@pytest.fixture(scope="session", autouse=True)
def _private_cache_env(tmp_path_factory):
    """Decoded data sets are cached in a session tmp folder, never in ~/.cache; $FEWSHOT_DATA is unset.
    The models here are tiny: one thread is as fast and does not fight other jobs for the cores."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSHOT_CACHE", str(tmp_path_factory.mktemp("fewshot-cache")))
    mp.delenv("FEWSHOT_DATA", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


# ------------------------------------------------------------------------------------------ synthetic tensors
def make_synthetic(n_classes: int = 12, per_class: int = 10, size: int = 12, seed: int = 0,
                   noise: float = 0.1, shift: int = 0, groups: int = 3) -> ClassDataset:
    """Each class a random binary pattern; each image that pattern with ``noise`` of its pixels flipped
    (and an optional random shift of up to ``shift`` pixels). Every image is distinct."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for c in range(n_classes):
        base = torch.rand(size, size, generator=g) < 0.4
        imgs = []
        seen = set()
        while len(imgs) < per_class:
            x = base.clone()
            if shift:
                dy, dx = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
                x = torch.roll(x, (dy, dx), dims=(0, 1))
            flip = torch.rand(size, size, generator=g) < noise
            x = x ^ flip
            img = (x.to(torch.uint8) * 200 + torch.randint(0, 40, (size, size), generator=g).to(torch.uint8))
            key = bytes(img.numpy())
            if key in seen:
                continue
            seen.add(key)
            imgs.append(img.unsqueeze(0))
        parts.append(torch.stack(imgs))
    names = [f"c{c:02d}" for c in range(n_classes)]
    grp = [f"g{c % groups}" for c in range(n_classes)] if groups else None
    return ClassDataset.from_class_tensors(parts, names, grp, source="synthetic")


@pytest.fixture
def synthetic() -> ClassDataset:
    """12 classes x 10 images of 1x12x12 uint8, groups g0/g1/g2 (4 classes each)."""
    return make_synthetic()


# ------------------------------------------------------------------------------------------ image files
def strokes(seed: int, size: int = 105, jitter: int = 0, width: int = 5) -> Image.Image:
    """A black-on-white 'character': a few thick random strokes (the class is ``seed``); ``jitter``
    moves every point by a small per-image offset drawn from ``seed`` and ``jitter``."""
    rng = random.Random(seed)
    pts_sets = []
    for _ in range(rng.randint(2, 4)):
        pts_sets.append([(rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)) for _ in range(rng.randint(2, 4))])
    j = random.Random(seed * 1000 + jitter)
    im = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(im)
    for pts in pts_sets:
        off = (j.uniform(-0.04, 0.04), j.uniform(-0.04, 0.04)) if jitter else (0, 0)
        d.line([((x + off[0]) * size, (y + off[1]) * size) for x, y in pts], fill=0, width=width)
    return im


#: The fake Omniglot layout: set -> {alphabet: [(character folder, character id)]}.
#: Greek is in both small sets with the same characters and images, as in the real release.
OMNI_SETS = {
    "images_background_small1": {
        "Balinese": [("character01", 1), ("character02", 2)],
        "Greek": [("character01", 10), ("character02", 11), ("character03", 12)],
        "Korean": [("character01", 20), ("character02", 21)],
    },
    "images_background_small2": {
        "Greek": [("character01", 10), ("character02", 11), ("character03", 12)],
        "Tagalog": [("character01", 30), ("character02", 31)],
    },
}
OMNI_DRAWERS = 4


def omniglot_png(char_id: int, drawer: int) -> bytes:
    import io
    buf = io.BytesIO()
    strokes(char_id, 105, jitter=drawer).convert("1").save(buf, format="PNG")  # 1-bit, like the release
    return buf.getvalue()


def write_omniglot_zip(dest: Path, set_name: str, extra: dict | None = None) -> Path:
    """``dest`` as a zip holding ``<set>/<Alphabet>/characterNN/<id>_<drawer>.png`` (105x105 PNG)."""
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr(set_name + "/", "")
        for alpha, chars in OMNI_SETS[set_name].items():
            zf.writestr(f"{set_name}/{alpha}/", "")
            for folder, cid in chars:
                zf.writestr(f"{set_name}/{alpha}/{folder}/", "")
                for d in range(1, OMNI_DRAWERS + 1):
                    zf.writestr(f"{set_name}/{alpha}/{folder}/{cid:04d}_{d:02d}.png", omniglot_png(cid, d))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory) -> Path:
    """A folder with fake images_background_small1.zip and images_background_small2.zip (read-only use)."""
    root = tmp_path_factory.mktemp("omniglot")
    for s in OMNI_SETS:
        write_omniglot_zip(root / f"{s}.zip", s)
    return root


def make_image_folder(root: Path, n_classes: int = 16, per_class: int = 8, size: int = 32) -> Path:
    """``root/class_XX/imgYY.png``: grey PNGs, dark strokes on light, a distinct stroke pattern per class."""
    for c in range(n_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            strokes(500 + c, size, jitter=i + 1, width=3).save(d / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """16 classes x 8 images (32x32 PNG); shared by tests that only read it."""
    return make_image_folder(tmp_path_factory.mktemp("images") / "data")


@pytest.fixture
def fresh_image_root(tmp_path) -> Path:
    """A private copy of the image folder (6 classes x 6 images) that a test may damage."""
    return make_image_folder(tmp_path / "data", n_classes=6, per_class=6)


def write_lake_zip(dest: Path, n_runs: int = 2, n_classes: int = 4) -> tuple[Path, dict]:
    """A small ``all_runs.zip`` in the published layout (``runNN/{training,test}``, ``class_labels.txt``);
    each test image is the training image of its class. Returns the zip and {run: {test: training}}."""
    import io
    truth = {}
    with zipfile.ZipFile(dest, "w") as zf:
        for r in range(1, n_runs + 1):
            run = f"run{r:02d}"
            perm = list(range(1, n_classes + 1))
            random.Random(r).shuffle(perm)
            imgs = {}
            for c in range(1, n_classes + 1):
                buf = io.BytesIO()
                strokes(900 + 10 * r + c, 105).save(buf, format="PNG")
                imgs[c] = buf.getvalue()
                zf.writestr(f"{run}/training/class{c:02d}.png", imgs[c])
            lines, ans = [], {}
            for i, c in enumerate(perm, 1):
                zf.writestr(f"{run}/test/item{i:02d}.png", imgs[c])
                lines.append(f"{run}/test/item{i:02d}.png {run}/training/class{c:02d}.png")
                ans[f"{run}/test/item{i:02d}.png"] = f"{run}/training/class{c:02d}.png"
            zf.writestr(f"{run}/class_labels.txt", "\n".join(lines) + "\n")
            truth[run] = ans
    return dest, truth


@pytest.fixture(scope="session")
def lake_zip(tmp_path_factory) -> Path:
    return write_lake_zip(tmp_path_factory.mktemp("lake") / "all_runs.zip")[0]


def image_bytes_index(ds: ClassDataset) -> dict:
    """bytes of every image -> (class, index within class); asserts the images are all distinct."""
    index = {}
    for c in range(len(ds)):
        for i, im in enumerate(ds.images(c)):
            index[bytes(im.contiguous().numpy())] = (c, i)
    assert len(index) == ds.num_images, "fixture images must be distinct"
    return index


def make_nuisance(n_classes: int = 60, per_class: int = 20, seed: int = 1, signal: int = 4,
                  noise: float = 0.05) -> ClassDataset:
    """A harder synthetic set (1x12x12): the class is a binary pattern in the top-left ``signal`` x ``signal``
    corner (``noise`` of its pixels flipped); every other pixel is uniform noise. Raw-pixel distances are
    dominated by the noise, so an embedding must learn to look at the corner (a learning test)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n_classes):
        base = torch.rand(signal, signal, generator=g) < 0.5
        x = torch.randint(0, 256, (per_class, 1, 12, 12), generator=g, dtype=torch.uint8)
        flip = torch.rand(per_class, signal, signal, generator=g) < noise
        x[:, 0, :signal, :signal] = (base ^ flip).to(torch.uint8) * 255
        parts.append(x)
    return ClassDataset.from_class_tensors(parts, [f"n{c:02d}" for c in range(n_classes)], source="nuisance")


def adam_steps(m, sampler, steps: int, lr: float = 1e-3, clip: float | None = None) -> None:
    """Train ``m`` (in training mode) for ``steps`` Adam steps of ``m.loss`` on episodes from ``sampler``,
    the gradient norm clipped at ``clip`` when given."""
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    m.train()
    for _ in range(steps):
        loss, _ = m.loss(sampler.sample())
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()


def learn_on_nuisance(method: str, steps: int = 300, **options) -> tuple:
    """``(model, before, after)``: 5-way 1-shot accuracy (200 episodes) on 20 unseen classes of the nuisance
    set, untrained and after ``steps`` 20-way 1-shot 5-query episodes on the other 40 (Adam 1e-3).
    ``options`` are the method's (e.g. ``backbone="mlp", mlp_hidden=[64], embedding=32``)."""
    import time
    from fewshot import methods
    from fewshot.episodes import EpisodeSampler
    from fewshot.evaluate import evaluate
    t = time.perf_counter()
    ds = make_nuisance()
    train_ds, test_ds = ds.split_fraction(test=1 / 3, seed=0)
    assert not set(train_ds.names) & set(test_ds.names)
    torch.manual_seed(0)
    m = methods.build(method, ds.image_shape, **options)
    test_sampler = EpisodeSampler(test_ds, 5, 1, 5, seed=0)
    before = evaluate(m, test_sampler, 200, progress=False)
    sampler = EpisodeSampler(train_ds, 20, 1, 5, seed=0)
    adam_steps(m, sampler, steps)
    after = evaluate(m, test_sampler, 200, progress=False)
    print(f"{method} {options}: 5-way 1-shot on held-out classes {before.mean:.1f}% untrained -> "
          f"{after.mean:.1f}% trained ({time.perf_counter() - t:.1f} s)")
    return m, before, after


def class_dirs(root: Path, n: int) -> list:
    """The first ``n`` class folders of an image-folder fixture (not its ``.fewshot-cache``)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))[:n]


def support_folder(image_root: Path, dest: Path, classes: int = 3, shots: int = 1) -> list:
    """Copy ``shots`` images of each of the first ``classes`` classes of ``image_root`` into ``dest/<class>/``
    (a support folder for ``fewshot predict``); returns the source class folders."""
    chosen = class_dirs(image_root, classes)
    for c in chosen:
        (dest / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:shots]:
            (dest / c.name / f.name).write_bytes(f.read_bytes())
    return chosen
