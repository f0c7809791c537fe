"""Neural Turing machine and the copy task: every addressing step and the erase/add write against hand-computed
numbers, the batched cell, the copy-task family, the bits-wrong metric through the evaluator, train -> eval ->
plot through the CLI, and a short training run that learns to copy short sequences."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot import methods, tasks
from fewshot.episodes import Episode
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.models import memory as mem
from fewshot.tasks.copy import CopyTasks, bits_wrong, copy_inputs, parse_lengths

from conftest import adam_steps
from test_cli import run_cli


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ addressing
def test_content_addressing_by_hand() -> None:
    M = t([[[1, 0], [0, 1], [1, 1]]])                    # 3 slots of width 2
    k = t([[[2, 0]]])                                    # parallel to slot 0, orthogonal to slot 1
    beta = t([[2.0]])
    cos = [1.0, 0.0, 1 / math.sqrt(2)]
    e = [math.exp(2 * c) for c in cos]
    want = [v / sum(e) for v in e]
    got = mem.content_weights(M, k, beta)
    assert got.shape == (1, 1, 3)
    assert torch.allclose(got[0, 0], t(want), atol=1e-6)
    # beta = 0: uniform whatever the key
    assert torch.allclose(mem.content_weights(M, k, t([[0.0]]))[0, 0], t([1 / 3] * 3))


def test_interpolation_gate_zero_one_and_between() -> None:
    wc, prev = t([[[0.7, 0.2, 0.1]]]), t([[[0.0, 0.0, 1.0]]])
    assert torch.equal(mem.interpolate(wc, prev, t([[1.0]])), wc)        # g = 1: content only
    assert torch.equal(mem.interpolate(wc, prev, t([[0.0]])), prev)      # g = 0: previous weighting kept
    got = mem.interpolate(wc, prev, t([[0.25]]))[0, 0]
    assert torch.allclose(got, t([0.25 * 0.7, 0.25 * 0.2, 0.25 * 0.1 + 0.75]))


def test_circular_shift_wraps_around() -> None:
    N = 5
    last, first = torch.zeros(1, 1, N), torch.zeros(1, 1, N)
    last[..., N - 1] = 1
    first[..., 0] = 1
    plus, minus, stay = t([[[0, 0, 1]]]), t([[[1, 0, 0]]]), t([[[0, 1, 0]]])   # shifts -1, 0, +1
    assert torch.equal(mem.circular_shift(last, plus), first)                  # slot 4 +1 -> slot 0
    assert torch.equal(mem.circular_shift(first, minus), last)                 # slot 0 -1 -> slot 4
    assert torch.equal(mem.circular_shift(last, stay), last)
    mid = torch.zeros(1, 1, N)
    mid[..., 2] = 1
    assert mem.circular_shift(mid, plus)[0, 0].argmax() == 3


def test_blurred_shift_by_hand() -> None:
    w = [0.5, 0.3, 0.2, 0.0, 0.0]
    s = {-1: 0.1, 0: 0.7, 1: 0.2}
    N = len(w)
    # w~(i) = sum_j w(j) s(i - j), indices modulo N
    want = [sum(w[j] * s.get(((i - j + 1) % N) - 1, 0.0) for j in range(N)) for i in range(N)]
    assert abs(sum(want) - 1) < 1e-9
    got = mem.circular_shift(t([[w]]), t([[[s[-1], s[0], s[1]]]]))[0, 0]
    assert torch.allclose(got, t(want), atol=1e-7)
    # explicitly: slot 4 receives 0.5 * s(-1) from slot 0; slot 3 receives 0.2 * s(+1) from slot 2
    assert got[4].item() == pytest.approx(0.05) and got[3].item() == pytest.approx(0.04)
    # a wider range -2..2
    s5 = t([[[0.1, 0.2, 0.4, 0.2, 0.1]]])
    w5 = t([[[1.0, 0, 0, 0, 0, 0]]])
    assert torch.allclose(mem.circular_shift(w5, s5)[0, 0], t([0.4, 0.2, 0.1, 0, 0.1, 0.2]))
    with pytest.raises(FewshotError, match="odd"):
        mem.circular_shift(w5, t([[[0.5, 0.5]]]))


def test_sharpening_by_hand() -> None:
    w = t([[[0.5, 0.3, 0.2, 0.0]]])
    got = mem.sharpen(w, t([[2.0]]))[0, 0]
    assert torch.allclose(got, t([0.25, 0.09, 0.04, 0.0]) / 0.38, atol=1e-6)
    assert torch.allclose(mem.sharpen(w, t([[1.0]])), w, atol=1e-6)         # gamma = 1 changes nothing
    assert mem.sharpen(w, t([[50.0]]))[0, 0, 0] > 0.999                     # large gamma: nearly one-hot


def test_full_addressing_matches_a_numpy_reference() -> None:
    g = torch.Generator().manual_seed(0)
    B, H, N, W = 2, 3, 7, 4
    M = torch.randn(B, N, W, generator=g)
    prev = torch.rand(B, H, N, generator=g).softmax(-1)
    key, beta = torch.randn(B, H, W, generator=g), torch.rand(B, H, generator=g) * 5
    gate, gamma = torch.rand(B, H, generator=g), 1 + torch.rand(B, H, generator=g) * 3
    shift = torch.rand(B, H, 3, generator=g).softmax(-1)
    got = mem.address(M, prev, key, beta, gate, shift, gamma)
    Mn, pn, kn, bn, gn, sn, yn = (v.double().numpy() for v in (M, prev, key, beta, gate, shift, gamma))
    for b in range(B):
        for h in range(H):
            cos = [kn[b, h] @ Mn[b, i] / (np.linalg.norm(kn[b, h]) * np.linalg.norm(Mn[b, i])) for i in range(N)]
            e = np.exp(bn[b, h] * np.array(cos))
            wc = e / e.sum()
            wg = gn[b, h] * wc + (1 - gn[b, h]) * pn[b, h]
            ws = np.array([sum(wg[j] * sn[b, h, (i - j + 1) % N] if (i - j) % N in (0, 1, N - 1) else 0.0
                               for j in range(N)) for i in range(N)])
            wp = ws ** yn[b, h]
            np.testing.assert_allclose(got[b, h].numpy(), wp / wp.sum(), atol=1e-5)


# ------------------------------------------------------------------------------------------ memory access
def test_read_is_the_weighted_sum_of_rows() -> None:
    M = t([[[1, 2], [3, 4], [5, 6]]])
    w = t([[[0.5, 0.25, 0.25], [0, 0, 1]]])
    assert torch.allclose(mem.read(M, w), t([[[0.5 + 0.75 + 1.25, 1 + 1 + 1.5], [5, 6]]]))


def test_erase_then_add_by_hand() -> None:
    M = t([[[1, 2, 3], [4, 5, 6]]])
    w = t([[[1.0, 0.0]]])                               # all attention on row 0
    e, a = t([[[1.0, 0.0, 0.5]]]), t([[[10, 20, 30]]])
    new = mem.write(M, w, e, a)
    assert torch.allclose(new, t([[[0 + 10, 2 + 20, 1.5 + 30], [4, 5, 6]]]))
    # split attention: M(i) <- M(i)(1 - w(i) e) + w(i) a
    w2 = t([[[0.5, 0.5]]])
    new = mem.write(M, w2, e, a)
    assert torch.allclose(new, t([[[0.5 + 5, 2 + 10, 2.25 + 15], [2 + 5, 5 + 10, 4.5 + 15]]]))
    # erase 0 and add 0 leave the memory alone; erase 1 with full attention clears the row
    assert torch.equal(mem.write(M, w, torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)), M)
    assert torch.equal(mem.write(M, w, torch.ones(1, 1, 3), torch.zeros(1, 1, 3))[0, 0], torch.zeros(3))


def test_several_write_heads_erase_all_then_add_all() -> None:
    g = torch.Generator().manual_seed(1)
    M = torch.randn(1, 4, 3, generator=g)
    w = torch.rand(1, 2, 4, generator=g).softmax(-1)
    e, a = torch.rand(1, 2, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    want = M.clone()
    for h in range(2):                                   # all erases ...
        for i in range(4):
            want[0, i] = want[0, i] * (1 - w[0, h, i] * e[0, h])
    for h in range(2):                                   # ... then all adds
        for i in range(4):
            want[0, i] = want[0, i] + w[0, h, i] * a[0, h]
    got = mem.write(M, w, e, a)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(mem.write(M, w.flip(1), e.flip(1), a.flip(1)), got, atol=1e-6)   # head order is irrelevant


# ------------------------------------------------------------------------------------------ the cell
def test_cell_with_several_heads_runs_batched_with_finite_gradients() -> None:
    torch.manual_seed(0)
    cell = mem.NTMCell(inputs=5, outputs=3, controller=12, memory_size=10, memory_width=4, read_heads=2,
                       write_heads=3, shift_range=2)
    x = torch.randn(4, 6, 5)
    y, trace = cell.run(x, record=True)
    assert y.shape == (4, 6, 3)
    assert trace["read_weights"].shape == (4, 6, 2, 10) and trace["write_weights"].shape == (4, 6, 3, 10)
    for w in (trace["read_weights"], trace["write_weights"]):
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5) and bool((w >= 0).all())
    assert trace["state"]["memory"].shape == (4, 10, 4)
    y.square().mean().backward()
    grads = [p.grad for p in cell.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for name in ("memory0", "read0", "weight0_logits", "h0", "c0"):      # the learned initial state learns
        assert getattr(cell, name).grad.abs().sum() > 0, name
    # batching is exact: one sequence alone gives the same outputs
    y1, _ = cell.run(x[2:3])
    assert torch.allclose(y1[0], y[2].detach(), atol=1e-5)


def test_methods_build_with_about_the_same_parameter_count() -> None:
    ntm, lstm = methods.build("ntm", (9,)), methods.build("lstm", (9,))
    n, m = ntm.parameter_count(), lstm.parameter_count()
    assert 60_000 < n < 70_000 and abs(n - m) / n < 0.05
    with pytest.raises(FewshotError, match="sequences"):
        methods.build("ntm", (1, 28, 28))
    with pytest.raises(FewshotError, match="memory slots"):
        methods.build("ntm", (9,), memory_size=2, shift_range=1)


# ------------------------------------------------------------------------------------------ the copy task
def test_copy_family_shapes_delimiter_and_determinism() -> None:
    fam = tasks.make("copy:5", 1, 1, batch=3, seed=7)
    assert tasks.is_family("copy:5") and tasks.is_family("copy") and not tasks.is_family("sine:3")
    ep = fam.sample()
    assert ep.query_x.shape == (3, 11, 9) and ep.query_y.shape == (3, 5, 8)
    assert ep.support_x.shape == (3, 0, 9) and ep.batch == 3
    x, y = ep.query_x, ep.query_y
    assert torch.equal(x[:, :5, :8], y)                          # the sequence ...
    assert bool((x[:, :5, 8] == 0).all())
    assert bool((x[:, 5, :8] == 0).all()) and bool((x[:, 5, 8] == 1).all())   # ... the delimiter ...
    assert bool((x[:, 6:] == 0).all())                           # ... then blank inputs while copying
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    again = tasks.make("copy:5", 1, 1, batch=3, seed=7).sample()
    assert torch.equal(again.query_x, ep.query_x)
    assert not torch.equal(tasks.make("copy:5", 1, 1, batch=3, seed=8).sample().query_x, ep.query_x)
    lengths = {tasks.make("copy", 1, 1, batch=2, seed=s).sample().query_y.shape[1] for s in range(40)}
    assert lengths <= set(range(1, 21)) and len(lengths) > 5
    assert {tasks.make("copy:2-3", 1, 1, seed=s).sample().query_y.shape[1] for s in range(20)} == {2, 3}
    assert parse_lengths("copy") == (1, 20) and parse_lengths("copy:40") == (40, 40)
    for bad in ("copy:0", "copy:5-2", "copy:x"):
        with pytest.raises(FewshotError, match="copy"):
            tasks.make(bad, 1, 1)
    assert torch.equal(copy_inputs(t([[[1, 0]]])), t([[[1, 0, 0], [0, 0, 1], [0, 0, 0]]]))


def test_bits_wrong_by_hand_and_through_the_evaluator() -> None:
    targets = t([[[1, 0], [0, 1]]])
    logits = t([[[9, 9], [9, 9], [9, -9], [-9, -9], [9, 9]]])     # the last 2 steps are the copy
    assert bits_wrong(logits, targets).tolist() == [2.0]         # (1,0) vs (-,-): 1 wrong; (0,1) vs (+,+): 1 wrong

    class Constant(torch.nn.Module):
        """Predicts every bit 0 (logit -1): exactly the 1-bits of the targets are wrong."""
        def predict_episode(self, ep: Episode) -> torch.Tensor:
            return -torch.ones(*ep.query_x.shape[:2], 8)

    fam = CopyTasks(batch=4, seed=3, lengths=(2, 6))
    res = evaluate(Constant(), fam, episodes=50, progress=False)
    fam.generator.manual_seed(fam.seed)
    ones = []
    while len(ones) < 50:                                        # the evaluator draws batches of 25
        ones += fam.sample(25).query_y.flatten(1).sum(1).tolist()
    assert res.metric == "bits" and res.n == 50
    assert res.accuracies == pytest.approx(ones[:50])
    assert res.mean == pytest.approx(float(np.mean(ones[:50])), rel=1e-5)
    assert res.score == -res.mean and "bits wrong per sequence" in str(res)


# ------------------------------------------------------------------------------------------ end to end
def _tiny(method: str, out: Path, *extra) -> list:
    sizes = ["--controller", "16", "--memory-size", "12", "--memory-width", "6"] if method == "ntm" \
        else ["--hidden", "16", "--layers", "2"]
    return ["train", method, "--data", "copy:1-3", "--batch", "4", "--episodes", "6", "--val-every", "3",
            "--val-episodes", "10", "--test-episodes", "25", "--no-progress", "--out", out, *sizes, *extra]


@pytest.mark.parametrize("method", ["ntm", "lstm"])
def test_train_eval_plot_through_the_cli(capsys, tmp_path: Path, method: str) -> None:
    run = tmp_path / method
    rc, out, err = run_cli(capsys, *_tiny(method, run))
    assert rc == 0, err
    assert "test error:" in out and "bits wrong per sequence" in out
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ck["train_config"]["optimizer"] == "rmsprop" and ck["train_config"]["grad_clip_value"] == 10
    assert ck["train_config"]["momentum"] == 0.9 and ck["in_shape"] == [9]
    rc, out, err = run_cli(capsys, "eval", run, "--data", "copy:6", "--episodes", "30", "--no-progress")
    assert rc == 0, err
    assert "bits wrong per sequence" in out and "30 tasks" in out
    saved = json.loads((run / "eval" / "copy-6-seed0.json").read_text())
    assert saved["metric"] == "bits" and saved["n"] == 30 and 0 <= saved["mean"] <= 6 * 8
    rc, out, err = run_cli(capsys, "plot", run, "--data", "copy:8")
    assert rc == 0, err
    assert (run / "plots" / "copy_task.png").stat().st_size > 5_000
    assert (run / "plots" / "learning_curves.png").is_file()
    rc, _, err = run_cli(capsys, "predict", run, "--support", tmp_path, "--query", tmp_path)
    assert rc == 2 and "task family" in err


def test_short_training_learns_to_copy_short_sequences() -> None:
    """A small NTM on sequences of length 1..2 (Adam, 400 steps): the held-out copy BCE drops well below chance
    (log 2) and fewer than half of the bits are wrong (chance: 8 of 16)."""
    from fewshot.tasks.copy import copy_bce
    torch.manual_seed(0)
    model = methods.build("ntm", (9,), controller=32, memory_size=16, memory_width=8)
    fam = CopyTasks(batch=16, seed=0, lengths=(1, 2))
    held = tasks.make("copy:2", 1, 1, batch=128, seed=99).sample()

    def held_out() -> tuple:
        with torch.no_grad():
            logits = model.predict(held.support_x, held.support_y, held.query_x)
        return float(copy_bce(logits, held.query_y)), float(bits_wrong(logits, held.query_y).mean())
    before, _ = held_out()
    adam_steps(model, fam, 400, lr=1e-2)
    after, wrong = held_out()
    assert before > 0.6                         # chance: log 2 = 0.69
    assert after < 0.5 * before, (before, after)
    assert wrong < 4, wrong                     # of 16 bits per sequence
