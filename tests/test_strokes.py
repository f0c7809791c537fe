"""Omniglot pen strokes as one-shot imitation tasks: parsing, resampling, the closed-loop score."""
import zipfile

import pytest
import torch

from conftest import need_shared
from fewshot.data.strokes import load_strokes, parse_drawing, resample, trajectory_distance
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.tasks.imitation import StrokeTasks


def test_parse_and_resample_by_arc_length():
    strokes = parse_drawing("START\n0,0,0\n52.5,0,10\nBREAK\n52.5,-52.5,20\n105,-52.5,30\n")
    assert [s.shape[0] for s in strokes] == [2, 2]
    path = resample(strokes, 5)          # canvas (0,0)->(1,0) then a pen-up move down, then right
    # the joined path: (-1, -1) -> (0, -1) -> (0, 0) -> (1, 0), length 3; 5 points at 0, .75, 1.5, 2.25, 3
    want = torch.tensor([[-1, -1], [-0.25, -1], [0, -0.5], [0.25, 0], [1, 0]], dtype=torch.float32)
    assert torch.allclose(path, want, atol=1e-6)
    with pytest.raises(FewshotError, match="line 2"):
        parse_drawing("START\nx,y\n", "bad.txt")


def _fake_strokes(root, chars=4, drawers=5):
    with zipfile.ZipFile(root / "strokes_background_small1.zip", "w") as z:
        for c in range(chars):
            for d in range(drawers):
                pts = "\n".join(f"{10 + 5 * i + c},{-20 - 3 * i - d},{i}" for i in range(6))
                z.writestr(f"strokes_background_small1/Alpha{c % 2}/character{c + 1:02d}/01{c:02d}_{d + 1:02d}.txt",
                           f"START\n{pts}\nBREAK\n")
        z.writestr("__MACOSX/._x.txt", "junk")
    return root


class _FollowDemo:
    """Replays the first support demonstration's moves by time step: its drawing is the demonstration."""
    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __init__(self, points):
        self.T = points

    def predict(self, sx, sy, qx, ways=None):
        t = (qx[..., 2] * (self.T - 1)).round().long()          # [B, 1]
        return sy.gather(1, t.unsqueeze(-1).expand(-1, -1, 2))


def test_closed_loop_score_of_the_demonstration_is_the_copy_baseline(tmp_path):
    st = load_strokes(_fake_strokes(tmp_path), points=8)
    assert len(st) == 4 and st.trajectories[0].shape == (5, 8, 2) and sorted(set(st.groups)) == ["Alpha0", "Alpha1"]
    fam = StrokeTasks(st, shots=1, queries=1, seed=3)
    ep = fam.sample(6)
    assert torch.allclose(fam.evaluate_episode(_FollowDemo(8), ep), fam.copy_baseline(ep), atol=1e-5)
    res = evaluate(_FollowDemo(8), fam, 10, progress=False)
    assert res.metric == "distance" and not res.higher_is_better and res.score == -res.mean
    with pytest.raises(FewshotError, match="drawers"):
        StrokeTasks(st, shots=3, queries=2)


def test_real_strokes_load():
    root = need_shared("omniglot", "strokes_background_small1.zip").parent
    st = load_strokes(root, points=50)
    assert len(st) == 242 and all(t.shape == (20, 50, 2) for t in st.trajectories)
    assert st.trajectories[0].abs().max() <= 1.5
    # drawers of one character are closer to each other than to drawers of another character
    a, b = st.trajectories[0], st.trajectories[1]
    assert trajectory_distance(a[:1], a[1:]).mean() < trajectory_distance(a[:1], b).mean()


def _fake_alphabets(root, alphabets=("Alpha", "Beta", "Korean"), chars=10, drawers=4):
    """Stroke archives of several alphabets (10 characters each) in the published zip layout."""
    with zipfile.ZipFile(root / "strokes_background_small1.zip", "w") as z:
        for a, alpha in enumerate(alphabets):
            for c in range(chars):
                for d in range(drawers):
                    pts = "\n".join(f"{10 + 4 * i + c + a},{-20 - (2 + a) * i - d},{i}" for i in range(6))
                    z.writestr(f"strokes_background_small1/{alpha}/character{c + 1:02d}/0{a}{c:02d}_{d + 1:02d}.txt",
                               f"START\n{pts}\nBREAK\n")
    return root


def test_strokes_family_splits_by_alphabet_and_trains_from_the_command_line(tmp_path, capsys):
    from fewshot import tasks
    from fewshot.cli import main
    root = _fake_alphabets(tmp_path)
    spec = f"strokes:{root},points=8,test=Korean"
    parts = {s: tasks.make(spec, 1, 1, split=s) for s in ("train", "val", "test")}
    assert [p.data.shape[0] for p in parts.values()] == [18, 2, 10]       # every 10th non-test character: val
    test_chars = {tuple(t.flatten().tolist()) for t in parts["test"].data}
    assert not test_chars & {tuple(t.flatten().tolist()) for t in parts["train"].data}
    assert tasks.family_tag(spec) == "strokes-" + root.name + ",points=8,test=Korean"
    base = ["train", "maml", "--data", spec, "--episodes", "3", "--backbone", "mlp", "--loss", "mse", "--bn", "none",
            "--no-progress"]
    # 4 drawers cannot supply the default 15 test queries: said before any training step
    assert main(base + ["--out", str(tmp_path / "early")]) == 2
    assert "drawers" in capsys.readouterr().err and not (tmp_path / "early" / "checkpoints").exists()
    out = tmp_path / "run"
    assert main(["train", "maml", "--data", spec, "--episodes", "3", "--backbone", "mlp", "--loss", "mse",
                 "--bn", "none", "--batch", "2", "--shots", "1", "--queries", "1", "--val-every", "0", "--test-queries", "1",
                 "--test-episodes", "5", "--out", str(out), "--no-progress"]) == 0
    assert "mean distance to the other drawers" in capsys.readouterr().out
    (js,) = (out / "eval").glob("strokes-*.json")
    assert ":" not in js.name and "/" not in js.name[len("strokes-"):]


@pytest.mark.parametrize("spec,match", [("strokes:{root},points=x", "points"), ("strokes:{root},bad=1", "unknown option"),
                                        ("strokes:{root},test=Nowhere", "Nowhere"), ("strokes", "strokes:PATH")])
def test_bad_strokes_specs(tmp_path, monkeypatch, spec, match):
    from fewshot import tasks
    monkeypatch.delenv("FEWSHOT_DATA", raising=False)
    root = _fake_alphabets(tmp_path)
    with pytest.raises(FewshotError, match=match):
        tasks.make(spec.format(root=root), 1, 1)
