"""MANN (Santoro et al. 2016) and its LSTM baseline: LRU access by hand on tiny tensors, one full memory step
against plain loops, the episode protocol (previous-label shift, every image once, instance numbers),
inference as parallel continuations of the support, learning above chance, and the CLI end to end."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fewshot as fs
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.methods import build
from fewshot.methods.mann import (State, instance_numbers, least_used, make_sequence, random_orders, read_memory,
                                  usage_update, write_memory, write_weights, zero_rows)
from fewshot.run import test_classes as held_out_classes

from conftest import adam_steps, make_synthetic
from test_cli import cli_roundtrip, run_cli


def _sig(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


# ------------------------------------------------------------------------------------------ LRU access by hand
def test_least_used_marks_the_n_smallest_usages_ties_by_slot_index() -> None:
    usage = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.9],
                          [0.0, 0.0, 0.0, 0.0, 0.0]])
    slots, w_lu = least_used(usage, 1)
    # task 0: slots 1 and 3 tie at the smallest usage 0.1: the lower index wins; task 1: all tie -> slot 0
    assert slots.tolist() == [[1], [0]]
    assert w_lu.tolist() == [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    slots, w_lu = least_used(usage, 3)
    assert slots.tolist() == [[1, 3, 2], [0, 1, 2]]            # ascending usage, then slot index
    assert w_lu.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    # without ties this is the paper's rule w^lu(i) = 1 iff w^u(i) <= m(w^u, n), the n-th smallest usage
    u = torch.tensor([[0.4, 0.05, 0.7, 0.2, 0.9, 0.3]])
    for n in range(1, 7):
        nth = sorted(u[0].tolist())[n - 1]
        assert least_used(u, n)[1][0].tolist() == [1.0 if v <= nth else 0.0 for v in u[0].tolist()]
    with pytest.raises(FewshotError):
        least_used(u, 7)


def test_usage_update_by_hand() -> None:
    usage = torch.tensor([[1.0, 0.0, 0.5]])
    read = torch.tensor([[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]])       # 2 heads
    write = torch.tensor([[[0.0, 1.0, 0.0], [0.1, 0.0, 0.9]]])
    got = usage_update(usage, read, write, 0.9)[0].tolist()
    want = [0.9 * 1.0 + 0.2 + 0.6 + 0.0 + 0.1, 0.0 + 0.3 + 0.2 + 1.0 + 0.0, 0.9 * 0.5 + 0.5 + 0.2 + 0.0 + 0.9]
    assert got == pytest.approx(want)


def test_write_weights_interpolate_previous_read_and_least_used_slot() -> None:
    alpha = torch.tensor([[0.0, math.log(3.0)]])                      # sigmoid: 0.5 and 0.75
    prev_read = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]])
    lu = torch.tensor([[2, 0]])                                       # head 0 -> slot 2, head 1 -> slot 0
    got = write_weights(alpha, prev_read, lu)[0]
    want = [[0.5 * 0.1, 0.5 * 0.2, 0.5 * 0.3 + 0.5, 0.5 * 0.4],
            [0.75 * 0.25 + 0.25, 0.75 * 0.25, 0.75 * 0.25, 0.75 * 0.25]]
    assert got.tolist() == [pytest.approx(r) for r in want]
    assert got.sum(-1).tolist() == pytest.approx([1.0, 1.0])         # a convex combination of two weightings


def test_least_used_row_is_zeroed_then_keys_are_added() -> None:
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    w_lu = torch.tensor([[0.0, 1.0, 0.0]])
    cleared = zero_rows(memory, w_lu)
    assert cleared[0].tolist() == [[1, 2], [0, 0], [5, 6]]
    ww = torch.tensor([[[0.2, 0.8, 0.0]]])
    key = torch.tensor([[[1.0, -1.0]]])
    got = write_memory(cleared, ww, key)[0].tolist()
    assert got == [pytest.approx(r) for r in [[1.2, 1.8], [0.8, -0.8], [5.0, 6.0]]]


def test_read_by_content_addressing_by_hand() -> None:
    memory = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]])
    keys = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    beta = torch.tensor([[3.0, 1.0]])
    w, r = read_memory(memory, keys, beta)
    for h in range(2):
        k = keys[0, h].numpy()
        sims = []
        for i in range(4):
            m = memory[0, i].numpy()
            nm = max(np.linalg.norm(m), 1e-8)
            sims.append(float(k @ m) / (np.linalg.norm(k) * nm))     # an empty row has similarity 0
        e = [math.exp(float(beta[0, h]) * s) for s in sims]
        want_w = [v / sum(e) for v in e]
        assert w[0, h].tolist() == pytest.approx(want_w, abs=1e-6)
        want_r = [sum(want_w[i] * float(memory[0, i, j]) for i in range(4)) for j in range(2)]
        assert r[0, h].tolist() == pytest.approx(want_r, abs=1e-6)


@pytest.mark.parametrize("paper", [True, False])
def test_one_full_memory_step_matches_plain_loops(paper: bool) -> None:
    """MANN.step: the least-used slots come from the previous usage, each head writes sigmoid(alpha) of its
    previous read weights plus the rest at its least-used slot (zeroed first), reads the updated memory.
    The paper's form writes the key k_t and reads with a fixed strength; the default writes a separate
    a_t = tanh(W_a h_t) and reads with a learned strength beta_t = softplus(W_b h_t) per head."""
    torch.manual_seed(0)
    N, W, H, gamma, beta = 4, 2, 2, 0.9, 2.0
    m = build("mann", (4,), controller=3, slots=N, width=W, heads=H, decay=gamma, key_strength=beta, classes=5,
              add_vector=not paper, learn_strength=not paper)
    mem = torch.randn(1, N, W)
    usage = torch.tensor([[0.3, 0.1, 0.7, 0.1]])
    read_w = torch.softmax(torch.randn(1, H, N), -1)
    reads = torch.randn(1, H, W)
    s = State(torch.randn(1, 3), torch.randn(1, 3), mem, usage, read_w, reads)
    feat, prev = torch.randn(1, 4), torch.eye(5)[[2]]
    with torch.no_grad():
        logits, s2 = m.step(feat, prev, s)
        h, _ = m.lstm(torch.cat([feat, prev, reads.flatten(1)], -1), (s.h, s.c))
        k = torch.tanh(m.key(h)).view(H, W).numpy().astype(np.float64)
        v = k if paper else torch.tanh(m.add(h)).view(H, W).numpy().astype(np.float64)
        betas = [beta] * H if paper else [math.log1p(math.exp(z)) for z in m.strength(h)[0].tolist()]
        a = m.gate(h)[0].tolist()
    lu = [1, 3]                   # usages 0.1 (slot 1) and 0.1 (slot 3) are the two smallest; ties by index
    M0, rw = mem[0].numpy().astype(np.float64), read_w[0].numpy().astype(np.float64)
    ww = [[_sig(a[hh]) * rw[hh][i] + (1 - _sig(a[hh])) * (1.0 if i == lu[hh] else 0.0) for i in range(N)]
          for hh in range(H)]
    M1 = [[(0.0 if i in lu else M0[i][j]) + sum(ww[hh][i] * v[hh][j] for hh in range(H)) for j in range(W)]
          for i in range(N)]
    wr, r = [], []
    for hh in range(H):
        cos = [sum(k[hh][j] * M1[i][j] for j in range(W)) / (math.sqrt(sum(v * v for v in k[hh]))
               * max(math.sqrt(sum(v * v for v in M1[i])), 1e-8)) for i in range(N)]
        e = [math.exp(betas[hh] * c) for c in cos]
        wr.append([v / sum(e) for v in e])
        r.append([sum(wr[hh][i] * M1[i][j] for i in range(N)) for j in range(W)])
    u1 = [gamma * float(usage[0, i]) + sum(wr[hh][i] + ww[hh][i] for hh in range(H)) for i in range(N)]
    assert s2.memory[0].tolist() == [pytest.approx(row, abs=1e-5) for row in M1]
    assert s2.read_w[0].tolist() == [pytest.approx(row, abs=1e-5) for row in wr]
    assert s2.reads[0].tolist() == [pytest.approx(row, abs=1e-5) for row in r]
    assert s2.usage[0].tolist() == pytest.approx(u1, abs=1e-5)
    with torch.no_grad():
        want_logits = m.out(torch.cat([h, torch.tensor(r, dtype=torch.float32).view(1, -1)], -1))
    assert torch.allclose(logits, want_logits, atol=1e-5)
    # the LSTM baseline: the same controller fed [x_t, y_{t-1}] only, output from h_t alone
    b = build("mann-lstm", (4,), controller=3, classes=5)
    with torch.no_grad():
        lg, s3 = b.step(feat, prev, State(s.h, s.c))
        h, cell = b.lstm(torch.cat([feat, prev], -1), (s.h, s.c))
    assert torch.allclose(lg, b.out(h)) and torch.equal(s3.c, cell) and s3.memory is None


# ------------------------------------------------------------------------------------------ the protocol
def test_sequence_shifts_labels_by_one_step_and_shows_every_image_once() -> None:
    B, T = 2, 6
    x = torch.arange(B * T, dtype=torch.float32).view(B, T, 1, 1, 1) * 10    # image value = 10 * its index
    y = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]])
    order = torch.stack([torch.tensor([3, 0, 5, 1, 4, 2]), torch.tensor([0, 1, 2, 3, 4, 5])])
    xs, ys, prev = make_sequence(x, y, 4, order)
    for b in range(B):
        seen = [int(v) // 10 - b * T for v in xs[b].flatten().tolist()]
        assert seen == order[b].tolist()                                      # in the given order
        assert sorted(seen) == list(range(T))                                 # every image exactly once
        assert ys[b].tolist() == [int(y[b, i]) for i in order[b].tolist()]     # labels travel with images
        assert prev[b, 0].tolist() == [0, 0, 0, 0]                           # nothing before the first step
        for t in range(1, T):
            want = [0.0] * 4
            want[int(ys[b, t - 1])] = 1.0
            assert prev[b, t].tolist() == want                                # the label of step t-1
    orders = random_orders(50, 7)
    assert (orders.sort(1).values == torch.arange(7)).all()                   # permutations
    assert len({tuple(o) for o in orders.tolist()}) > 40                      # drawn per task


def test_instance_numbers_count_earlier_appearances() -> None:
    y = torch.tensor([[2, 0, 2, 2, 1, 0, 1, 2]])
    want, seen = [], {}
    for v in y[0].tolist():
        seen[v] = seen.get(v, 0) + 1
        want.append(seen[v])
    assert instance_numbers(y)[0].tolist() == want == [1, 1, 2, 3, 1, 2, 2, 4]


def test_instance_accuracy_bookkeeping(monkeypatch) -> None:
    """A network that is right exactly from the 2nd instance on scores 0% at k = 1 and 100% after."""
    m = build("mann", (1, 4, 4), controller=8, slots=8, width=4, heads=1)

    def oracle(x, y, order, ways, trace=None):
        ys = y.gather(1, order)
        wrong = (ys + 1) % ways
        pred = torch.where(instance_numbers(ys) >= 2, ys, wrong)
        return torch.nn.functional.one_hot(pred, ways).float(), ys
    monkeypatch.setattr(m, "sequence_logits", oracle)
    ds = make_synthetic(n_classes=6, per_class=10, size=4)
    res = m.evaluate_instances(ds, episodes=30, ways=5, per_class=10, batch=7)
    assert sorted(res) == [1, 2, 3, 5, 10]
    assert res[1]["acc"] == 0 and res[1]["n"] == 30 and res[1]["ci95"] == 0
    assert all(res[k]["acc"] == 100 for k in (2, 3, 5, 10))


# ------------------------------------------------------------------------------------------ inference
def _tiny(name="mann", **kw):
    torch.manual_seed(1)
    return build(name, (1, 6, 6), controller=16, slots=12, width=6, heads=2, classes=4, **kw).eval()


def test_predict_shapes_and_queries_do_not_see_each_other() -> None:
    for name in ("mann", "mann-lstm"):
        m = _tiny(name)
        sx, sy = torch.rand(2, 6, 1, 6, 6), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
        qx = torch.rand(2, 5, 1, 6, 6)
        with torch.no_grad():
            logits = m.predict(sx, sy, qx, 3)
            assert logits.shape == (2, 5, 3) and logits.dtype == torch.float32
            assert torch.equal(logits, m.predict(sx, sy, qx, 3))                  # deterministic
            qx2 = qx.clone()
            qx2[:, 1] = torch.rand(2, 1, 6, 6)
            other = m.predict(sx, sy, qx2, 3)
            keep = [0, 2, 3, 4]
            assert torch.allclose(logits[:, keep], other[:, keep], atol=1e-6)  # changing one query changes
            assert not torch.allclose(logits[:, 1], other[:, 1])              # only its own output
            alone = m.predict(sx, sy, qx[:, 3:4], 3)
            assert torch.allclose(alone[:, 0], logits[:, 3], atol=1e-6)
            assert m.predict(sx, sy, qx[:, :0], 3).shape == (2, 0, 3)


def test_a_query_is_one_more_step_after_the_shuffled_support() -> None:
    m = _tiny()
    sx, sy, qx = torch.rand(1, 6, 1, 6, 6), torch.tensor([[0, 0, 1, 1, 2, 2]]), torch.rand(1, 2, 1, 6, 6)
    with torch.no_grad():
        logits = m.predict(sx, sy, qx, 3)
        order = random_orders(1, 6, generator=torch.Generator().manual_seed(0))   # predict's fixed order
        for j in range(2):
            x = torch.cat([sx[:, order[0]], qx[:, j:j + 1]], 1)
            y = torch.cat([sy[:, order[0]], torch.zeros(1, 1, dtype=torch.long)], 1)   # query label unused
            seq, _ = m.sequence_logits(x, y, torch.arange(7).unsqueeze(0), 3)
            assert torch.allclose(seq[0, -1], logits[0, j], atol=1e-5)
    m.config.query_label = "zero"
    with torch.no_grad():
        assert not torch.allclose(m.predict(sx, sy, qx, 3), logits)


def test_bad_options_and_too_many_ways_are_one_line_errors() -> None:
    with pytest.raises(FewshotError, match="unknown encoder"):
        build("mann", (1, 8, 8), encoder="resnet")
    with pytest.raises(FewshotError, match="conv4 encoder needs"):
        build("mann", (1, 8, 8), encoder="conv4")
    with pytest.raises(FewshotError, match="heads"):
        build("mann", (1, 8, 8), heads=9, slots=8)
    with pytest.raises(FewshotError, match="decay"):
        build("mann", (1, 8, 8), decay=1.5)
    m = _tiny()
    with pytest.raises(FewshotError, match="outputs 4 classes"):
        m.predict(torch.rand(1, 5, 1, 6, 6), torch.arange(5).unsqueeze(0), torch.rand(1, 1, 1, 6, 6), 5)
    assert build("mann-lstm", (1, 8, 8)).config.memory is False
    assert build("mann", (1, 20, 20), encoder="conv4", hidden=8).predict(
        torch.rand(1, 2, 1, 20, 20), torch.tensor([[0, 1]]), torch.rand(1, 3, 1, 20, 20), 2).shape == (1, 3, 2)


# ------------------------------------------------------------------------------------------ learning
def test_short_training_beats_chance_at_the_second_instance() -> None:
    """300 steps on sequences of 3 synthetic classes x 5 images already teach MANN to use the labels given
    earlier in the sequence: on held-out classes the 2nd instance of a class is labelled clearly above chance
    (33%). (The 1st instance also beats chance once the network learns to answer a label not given yet; the
    rise with the instance number that long-term binding brings needs far longer training: see
    benchmarks/mann_omniglot.py.)"""
    torch.manual_seed(0)
    ds = make_synthetic(n_classes=40, per_class=10, size=8, noise=0.05, groups=0)
    train_ds, test_ds = ds.split_fraction(test=0.25, seed=0)
    m = build("mann", ds.image_shape, controller=64, slots=16, width=16, heads=1, classes=3,
              learn_strength=True)
    sampler = EpisodeSampler(train_ds, 3, 3, 2, batch=16, seed=0)
    adam_steps(m, sampler, 300, lr=3e-3, clip=10.0)
    res = m.evaluate_instances(test_ds, episodes=300, ways=3, per_class=5, instances=(1, 2, 3))
    assert res[2]["n"] == 300
    assert res[2]["acc"] - res[2]["ci95"] > 100 / 3 + 6, res



# ------------------------------------------------------------------------------------------ CLI
#: small MANN sizes for the command-line tests (the run shapes come from cli_roundtrip's)
SMALL = ["--batch", "2", "--controller", "16", "--slots", "16", "--width", "8", "--classes", "3"]


def test_cli_train_eval_predict_plot(capsys, tmp_path: Path, image_root: Path) -> None:
    run = tmp_path / "mann"
    cli_roundtrip(capsys, run, image_root, "mann", *SMALL, shots=2, query=(2, 1))
    cfg = fs.RunConfig.load(run / "config.yaml")
    assert cfg.options["classes"] == 3 and cfg.train.grad_clip == 10.0          # the method's run defaults
    rc, _, err = run_cli(capsys, "eval", run, "--ways", "5", "--queries", "2", "--episodes", "5", "--no-progress")
    assert rc == 2 and "outputs 3 classes" in err and "Traceback" not in err
    for name in ("instance_accuracy.png", "memory_access.png", "tsne_test_classes.png", "learning_curves.png"):
        assert (run / "plots" / name).stat().st_size > 5_000, name


def test_cli_lstm_baseline(capsys, tmp_path: Path, image_root: Path) -> None:
    rc, out, err = run_cli(capsys, "train", "mann-lstm", "--data", image_root, "--size", "16", "--ways", "3",
                           "--shots", "2", "--queries", "2", "--episodes", "3", "--split", "fraction:0.5",
                           "--val-every", "0", *SMALL, "--test-ways", "3", "--test-queries", "2",
                           "--test-episodes", "10", "--no-progress", "--out", tmp_path / "mann-lstm")
    assert rc == 0, err
    run = fs.load_run(tmp_path / "mann-lstm")
    assert run.method.config.memory is False and not hasattr(run.method, "key")
    ep = EpisodeSampler(held_out_classes(run), 3, 1, 2, seed=0).sample(2)
    assert run.method.predict_episode(ep).shape == (2, 6, 3)
