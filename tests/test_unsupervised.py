"""Label-free training tasks (fewshot.unsupervised): the --tasks spec, k-means and hyperplane partitions,
CACTUs and UMTRA samplers (shape, cluster membership, exact resume), unlabelled folders, and the proof that
no label reaches training (shuffled labels give identical weights)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import fewshot as fs
from fewshot import unsupervised as U
from fewshot.cli import main
from fewshot.errors import FewshotError

from conftest import make_synthetic


def test_parse_tasks_defaults_settings_and_errors() -> None:
    assert U.parse_tasks("labels").kind == "labels"
    t = U.parse_tasks("cactus:embedding=pca,k=200,partitions=20,margin=0.5")
    assert (t.kind, t.embedding, t.k, t.partitions, t.margin, t.steps) == ("cactus", "pca", 200, 20, 0.5, 300)
    assert U.parse_tasks(str(t)) == t                               # the string form reads back equal
    for bad, word in (("clusters", "unknown tasks"), ("cactus:k=x", "k must be int"), ("cactus:kk=3", "KEY=VALUE"),
                      ("cactus:embedding=vae", "embedding must be"), ("umtra:k=3", "takes no settings"),
                      ("cactus:partitions=0", "at least 1")):
        with pytest.raises(FewshotError, match=word):
            U.parse_tasks(bad)
    with pytest.raises(FewshotError, match="--tasks"):
        fs.RunConfig(tasks="clusters").check()


def test_image_pool_ignores_labels_and_order(synthetic) -> None:
    perm = torch.randperm(synthetic.num_images, generator=torch.Generator().manual_seed(3))
    shuffled = synthetic.relabel(perm % 5)                        # same images, other classes, other order
    assert not torch.equal(shuffled.data, synthetic.data)
    assert torch.equal(U.image_pool(shuffled), U.image_pool(synthetic))


def test_kmeans_recovers_separated_blobs() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 8, generator=g) * 20
    z = (centers.repeat_interleave(30, 0) + torch.randn(180, 8, generator=g))
    lab = U.kmeans(z, 6, torch.Generator().manual_seed(1))
    truth = torch.arange(6).repeat_interleave(30)
    for c in range(6):                                             # each blob is exactly one cluster
        assert lab[truth == c].unique().numel() == 1
    assert lab.unique().numel() == 6


def test_hyperplane_cells_and_margin() -> None:
    z = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    cells = U.hyperplane_cells(z, 3, 0.0, torch.Generator().manual_seed(1))
    assert cells.min() >= 0 and cells.max() < 8
    kept = U.hyperplane_cells(z, 3, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(kept[kept >= 0], cells[kept >= 0]) and (kept < 0).any()


def test_partitions_drop_small_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(40, 2, generator=g) + 50 * i for i in range(5)] + [torch.full((3, 2), -500.)])
    spec = U.parse_tasks("cactus:embedding=pixels,k=6,partitions=4")
    P = U.partitions(z, spec, ways=3, need=10, seed=0)
    assert P.shape == (4, 203)
    assert (P[0, -3:] == -1).all()                                 # the 3-point cluster is left out
    for row in P:
        ids, counts = row[row >= 0].unique(return_counts=True)
        assert (counts >= 10).all() and torch.equal(ids, torch.arange(len(ids)))
    with pytest.raises(FewshotError, match="no kmeans partition"):
        U.partitions(z, spec, ways=6, need=41, seed=0)


def _cactus(pool, **kw):
    spec = U.parse_tasks("cactus:embedding=pca,dim=8,k=10,partitions=5")
    return U.CactusSampler(pool, spec, ways=4, shots=2, queries=3, batch=6, seed=0, cache=False, **kw)


def test_cactus_tasks_are_clusters_of_one_partition() -> None:
    ds = make_synthetic(n_classes=10, per_class=20, size=12)
    s = _cactus(U.image_pool(ds)).prepare()
    ep = s.sample()
    assert ep.support_x.shape == (6, 8, 1, 12, 12) and ep.query_x.shape == (6, 12, 1, 12, 12)
    assert ep.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and ep.query_y.shape == (6, 12)
    flat = s.flat.view(s.num_images, -1)
    labels = s.labels.long()
    for b in range(6):
        imgs = torch.cat([ep.support_x[b].view(4, 2, -1), ep.query_x[b].view(4, 3, -1)], 1)   # [N, K+Q, D]
        idx = torch.stack([torch.stack([(flat == im).all(1).nonzero()[0, 0] for im in way]) for way in imgs])
        assert idx.unique().numel() == 20                          # K + Q distinct images per way, no overlap
        fits = [p for p in range(labels.shape[0])
                if all(labels[p, idx[n]].unique().numel() == 1 and labels[p, idx[n, 0]] >= 0 for n in range(4))
                and labels[p, idx[:, 0]].unique().numel() == 4]
        assert fits, "every way is one cluster, the ways distinct clusters, all in one partition"


def test_cactus_resume_is_exact_without_rebuilding() -> None:
    pool = U.image_pool(make_synthetic(n_classes=10, per_class=20, size=12))
    a = _cactus(pool)
    a.sample()
    state = a.state_dict()
    nxt = a.sample()
    b = _cactus(pool)                                              # fresh: partitions come from the state
    b.load_state_dict(state)
    assert b.embedding is None
    again = b.sample()
    assert torch.equal(nxt.support_x, again.support_x) and torch.equal(nxt.query_x, again.query_x)


def test_cactus_too_few_images_is_one_line() -> None:
    pool = U.image_pool(make_synthetic(n_classes=2, per_class=10, size=12))
    with pytest.raises(FewshotError, match=r"20 training images are too few .* k = 4 clusters .* at least 24"):
        U.CactusSampler(pool, U.parse_tasks("cactus:embedding=pca"), ways=4, shots=1, queries=5)


def test_umtra_support_is_the_image_queries_its_augmentations() -> None:
    pool = U.image_pool(make_synthetic(n_classes=6, per_class=10, size=16))
    mark = lambda x, g: x.flip(-1) + torch.rand(x.shape[:2], generator=g)[..., None, None, None]  # noqa: E731
    s = U.UmtraSampler(pool, ways=5, shots=2, queries=3, batch=4, seed=0, augment=mark)
    ep = s.sample()
    assert ep.support_x.shape == (4, 10, 1, 16, 16) and ep.query_x.shape == (4, 15, 1, 16, 16)
    flat = s.flat.view(s.num_images, -1)
    for b in range(4):
        first = ep.support_x[b, ::2]                               # each way's first support image ...
        assert torch.stack([(flat == im.reshape(-1)).all(1).any() for im in first]).all()   # ... a pool image
        assert torch.unique(first.reshape(5, -1), dim=0).shape[0] == 5      # five distinct images
        for n in range(5):                                         # the rest: that image, augmented
            views = torch.cat([ep.support_x[b, 2 * n + 1:2 * n + 2], ep.query_x[b, 3 * n:3 * n + 3]])
            offsets = views - first[n].flip(-1)
            assert torch.allclose(offsets, offsets.amin((1, 2, 3), keepdim=True).expand_as(offsets), atol=1e-5)
    assert U.UmtraSampler(pool, ways=5, shots=1, queries=3).sample().support_x.shape == (1, 5, 1, 16, 16)


def _write_flat(folder, ds) -> None:
    folder.mkdir(parents=True)
    for i in range(ds.num_images):
        Image.fromarray(ds.data[i, 0].numpy()).save(folder / f"img{i:04d}.png")


def _cfg(data: str, tasks: str, **kw) -> fs.RunConfig:
    cfg = fs.RunConfig(method="protonet", data=data, size=16, tasks=tasks, split="none", ways=4, shots=1,
                       queries=3, device="cpu", precision="fp32", channels_last=False, **kw)
    cfg.options = {"backbone": "mlp", "mlp_hidden": [32], "embedding": 16}
    cfg.train.episodes, cfg.train.val_every, cfg.train.ckpt_every, cfg.train.log_every = 15, 0, 15, 15
    return cfg


def test_no_label_reaches_training(tmp_path, monkeypatch) -> None:
    """A flat folder, the same images with their real labels, and with shuffled labels: identical weights."""
    ds = make_synthetic(n_classes=8, per_class=12, size=16)
    flat = tmp_path / "flat"
    _write_flat(flat, ds)
    loaded = U.unlabeled_folder(flat, size=16, cache=False)
    assert len(loaded) == 1 and loaded.num_images == ds.num_images
    perm = torch.randperm(ds.num_images, generator=torch.Generator().manual_seed(0))
    weights = []
    for i, source in enumerate([None, ds, loaded.relabel(perm % 7)]):
        monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / f"cache{i}"))    # no partitions shared between runs
        cfg = _cfg(str(flat), "cactus:embedding=pca,dim=8,k=8,partitions=4")
        run = fs.fit(cfg, tmp_path / f"run{i}", progress=False, dataset=source)
        assert run.config.split == "none"
        weights.append(run.method.state_dict())
    for w in weights[1:]:
        assert w.keys() == weights[0].keys()
        assert all(torch.equal(w[k], weights[0][k]) for k in w)


def test_umtra_run_and_labelled_split_keep_test_labels(tmp_path) -> None:
    """A labelled folder with a class split: the training classes' labels are dropped, the test classes
    keep theirs and the run tests on them."""
    root = tmp_path / "labelled"
    ds = make_synthetic(n_classes=10, per_class=10, size=16)
    for c in range(len(ds)):
        d = root / ds.names[c]
        d.mkdir(parents=True)
        for i, im in enumerate(ds.images(c)):
            Image.fromarray(im[0].numpy()).save(d / f"{i}.png")
    cfg = _cfg(str(root), "umtra", test_ways=3, test_shots=1)
    cfg.split, cfg.val_fraction = "fraction:0.3", 0.0
    run = fs.fit(cfg, tmp_path / "run", progress=False, check_test=True)
    res = fs.evaluate_run(run, episodes=20, progress=False)
    assert res.ways == 3 and res.n == 20 and 0 <= res.mean <= 100


def test_cli_flat_folder_too_small_and_bad_split(tmp_path, capsys) -> None:
    flat = tmp_path / "few"
    _write_flat(flat, make_synthetic(n_classes=2, per_class=5, size=16))
    base = ["train", "protonet", "--data", str(flat), "--size", "16", "--ways", "4", "--shots", "1",
            "--queries", "5", "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(base + ["--tasks", "cactus:embedding=pca"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "10 training images are too few" in err and "24" in err
    assert main(base + ["--tasks", "cactus", "--split", "fraction:0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--split fraction:0.2" in err and "unlabelled" in err


def test_cactus_run_resumes_exactly(tmp_path, monkeypatch) -> None:
    """10 episodes, then --resume to 20, equals 20 in one go; the resumed run reads its partitions from the
    checkpoint (the embedding is not learned again: no cache to fall back on)."""
    ds = make_synthetic(n_classes=8, per_class=12, size=16)
    flat = tmp_path / "flat"
    _write_flat(flat, ds)
    spec = "cactus:embedding=pca,dim=8,k=8,partitions=4"
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache-a"))
    cfg = _cfg(str(flat), spec)
    cfg.train.episodes, cfg.train.ckpt_every = 20, 10
    whole = fs.fit(cfg, tmp_path / "whole", progress=False).method.state_dict()
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache-b"))
    cfg = _cfg(str(flat), spec)
    cfg.train.episodes, cfg.train.ckpt_every = 10, 10
    fs.fit(cfg, tmp_path / "parts", progress=False)
    monkeypatch.setattr(U, "learn_embedding", lambda *a, **k: pytest.fail("resume learned the embedding again"))
    cfg = _cfg(str(flat), spec)
    cfg.train.episodes, cfg.train.ckpt_every = 20, 10
    resumed = fs.fit(cfg, tmp_path / "parts", progress=False, resume=True).method.state_dict()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
