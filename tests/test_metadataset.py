"""Meta-Dataset episodes (Triantafillou et al. 2020, section 3.2): the protocol's constraints, determinism,
memory-mapped data, and evaluation of a label-based method on them."""
import math

import numpy as np
import pytest
import torch

from fewshot import methods
from fewshot.data import mapped
from fewshot.data.dataset import ClassDataset
from fewshot.errors import FewshotError
from fewshot.metadataset import MetaDatasetSampler, evaluate_variable


def _uneven(classes=60, seed=0, shape=(1, 4, 4)):
    """Classes of very different sizes (3 .. ~400 images); every image carries its class and its index."""
    rng = np.random.default_rng(seed)
    counts = [int(c) for c in np.clip(rng.lognormal(3.5, 1.2, classes).astype(int), 3, 400)]
    counts[0], counts[1] = 3, 400
    data = torch.zeros(sum(counts), *shape, dtype=torch.uint8)
    i = 0
    for c, n in enumerate(counts):
        data[i:i + n, 0, 0, 0] = c
        data[i:i + n, 0, 0, 1] = torch.arange(n) % 256
        data[i:i + n, 0, 0, 2] = torch.arange(n) // 256
        i += n
    return ClassDataset(data, counts, [f"c{k}" for k in range(classes)])


def _ids(x):
    """(class, index) of each image of an episode tensor [1, M, C, H, W] (uint8)."""
    p = x[0, :, 0, 0].long()
    return p[:, 0], p[:, 1] + 256 * p[:, 2]


def test_episodes_follow_the_protocol():
    ds = _uneven()
    s = MetaDatasetSampler(ds, seed=3, dtype=None)
    ways_seen, big_share, small_share = set(), [], []
    for _ in range(300):
        classes, shots, q = s.describe()
        n = ds.counts[classes]
        N = len(classes)
        ways_seen.add(N)
        assert 5 <= N <= 50 and len(set(classes.tolist())) == N
        assert q == min(10, int((n // 2).min())) and q >= 1
        assert (shots >= 1).all() and (shots <= n - q).all()
        assert int(shots.sum()) <= 500
    assert min(ways_seen) == 5 and max(ways_seen) == 50 and len(ways_seen) > 30      # uniform over 5..50
    s = MetaDatasetSampler(ds, seed=4, dtype=None)
    for _ in range(60):
        ep = s.sample()
        N, q = ep.ways, ep.queries
        assert ep.batch == 1 and ep.support_x.shape[1] == int(ep.extra["shots"].sum()) == ep.support_y.shape[1]
        assert ep.query_x.shape[1] == N * q and ep.query_y.tolist() == [sum([[k] * q for k in range(N)], [])]
        assert ep.shots == int(ep.extra["shots"].min())
        sc, si = _ids(ep.support_x)
        qc, qi = _ids(ep.query_x)
        chosen = ep.classes[0]
        assert torch.equal(sc, chosen[ep.support_y[0]]) and torch.equal(qc, chosen[ep.query_y[0]])
        for k in range(N):          # support and query images of a class are distinct and in range
            a = set(si[ep.support_y[0] == k].tolist())
            b = set(qi[ep.query_y[0] == k].tolist())
            assert not a & b and len(a) == int(ep.extra["shots"][0, k]) and len(b) == q
            assert max(a | b) < int(ds.counts[chosen[k]])
        shots = ep.extra["shots"][0].double()
        big, small = shots[ds.counts[chosen] >= 200], shots[ds.counts[chosen] <= 20]
        big_share += big.tolist()
        small_share += small.tolist()
    # class-imbalanced shots: large classes get more support images than small ones
    assert np.mean(big_share) > 3 * np.mean(small_share)


def test_support_size_budget_formula():
    """|S| = min(500, sum ceil(beta min(100, n_c - q))) and the shots fill it up to the floors."""
    ds = _uneven(classes=12, seed=1)
    s = MetaDatasetSampler(ds, seed=0, dtype=None)
    for _ in range(100):
        state = s.state_dict()
        classes, shots, q = s.describe()
        # replay the draws to see beta
        s.load_state_dict(state)
        g = s.generator
        n_way = int(torch.randint(s.min_ways, s.max_ways + 1, (1,), generator=g))
        torch.randperm(len(ds), generator=g)
        beta = float(torch.rand((), generator=g, dtype=torch.float64))
        rest = (ds.counts[classes] - q).clamp(max=100).double()
        size = min(500, int((torch.floor(beta * rest) + 1).sum()))
        assert n_way == len(classes) and n_way <= size <= 500
        assert int(shots.sum()) <= size
        s.describe()        # leave the generator where describe() left it
    with pytest.raises(FewshotError, match="one at a time"):
        s.sample(4)


def test_deterministic_resumable_and_the_same_on_a_memory_mapped_set(tmp_path):
    ds = _uneven(classes=20, seed=2)
    a, b = MetaDatasetSampler(ds, seed=7), MetaDatasetSampler(ds, seed=7)
    for _ in range(3):
        ea, eb = a.sample(), b.sample()
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_y, eb.query_y)
    state = a.state_dict()
    nxt = a.sample()
    a.load_state_dict(state)
    assert torch.equal(a.sample().support_x, nxt.support_x)
    mapped.write_cache(tmp_path / "d.fsmm", "fp", mapped.plan_of(ds))
    mm = mapped.open_cache(tmp_path / "d.fsmm", "fp")
    c, d = MetaDatasetSampler(ds, seed=1), MetaDatasetSampler(mm, seed=1)
    for _ in range(3):
        ec, ed = c.sample(), d.sample()
        assert torch.equal(ec.support_x, ed.support_x) and torch.equal(ec.query_x, ed.query_x)
        assert ec.support_x.dtype == torch.float32 and float(ec.support_x.max()) <= 1


def test_too_small_data_is_refused():
    with pytest.raises(FewshotError, match="at least 5 ways but the data has only 4 classes"):
        MetaDatasetSampler(_uneven(classes=4))
    ds = ClassDataset(torch.zeros(7, 1, 2, 2, dtype=torch.uint8), [2, 1, 1, 1, 2], list("abcde"))
    with pytest.raises(FewshotError, match="class 'b' has 1 image"):
        MetaDatasetSampler(ds)


def test_a_label_based_method_evaluates_on_variable_episodes(synthetic):
    torch.manual_seed(0)
    net = methods.build("protonet", synthetic.image_shape, backbone="mlp")
    s = MetaDatasetSampler(synthetic, seed=0, max_ways=8)
    res = evaluate_variable(net, s, episodes=6)
    assert res.n == 6 and res.mode == "meta-dataset" and 0 <= res.mean <= 100 and math.isfinite(res.loss)
    again = evaluate_variable(net, s, episodes=6)
    assert again.accuracies == res.accuracies                  # reset to its seed: the same tasks


def test_cli_eval_with_the_meta_dataset_protocol(tmp_path, capsys):
    """`fewshot eval RUN --protocol meta-dataset`: variable-way episodes from the run's test classes, the same
    numbers on every call (seeded), a result file beside the fixed-protocol ones."""
    import json
    from conftest import make_image_folder
    from fewshot.cli import main
    root = make_image_folder(tmp_path / "imgs", n_classes=20, per_class=8, size=16)
    out = tmp_path / "run"
    assert main(["train", "protonet", "--data", str(root), "--size", "16", "--ways", "5", "--shots", "2",
                 "--queries", "2", "--episodes", "3", "--split", "fraction:0.5", "--val-every", "0", "--no-eval",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    lines = []
    for _ in range(2):
        assert main(["eval", str(out), "--protocol", "meta-dataset", "--episodes", "6", "--no-progress"]) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert lines[0] == lines[1] and "6 Meta-Dataset episodes" in lines[0]
    res = json.loads((out / "eval" / "metadataset-seed0.json").read_text())
    assert res["mode"] == "meta-dataset" and res["n"] == 6 and res["classes"] == 10 and 0 <= res["mean"] <= 100
