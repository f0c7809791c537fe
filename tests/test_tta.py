"""Test-time augmentation: the copies' maths against a hand computation, reproducibility, memory chunking,
and the eval / predict / Lake-runs commands with --tta."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_synthetic, support_folder
from fewshot import methods
from fewshot import tta as tta_mod
from fewshot.episodes import EpisodeSampler
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.methods.protonet import distance, prototypes
from fewshot.tta import TestTimeAugment, with_tta
from test_cli import assert_one_line_error, run_cli

SCALE = 1e4
IDENTITY = {"affine": {"degrees": 0, "scale": [1, 1], "shear": 0, "translate": 0}}


@pytest.fixture
def proto_and_episode():
    torch.manual_seed(0)
    ds = make_synthetic(n_classes=8, per_class=6, size=16)
    # an untrained net puts every embedding close together: scale the logits so classes are not near-ties;
    # squared distances: the mean-embedding rule below is exact for them
    m = methods.build("protonet", ds.image_shape, hidden=8, scale=SCALE, distance="sqeuclidean").eval()
    ep = EpisodeSampler(ds, 4, 2, 3, seed=1).sample(3)
    return m, ep


def test_identity_copies_change_nothing(proto_and_episode) -> None:
    m, ep = proto_and_episode
    plain = m.predict(ep.support_x, ep.support_y, ep.query_x, 4).log_softmax(-1)
    aug = TestTimeAugment(m, 3, IDENTITY).predict(ep.support_x, ep.support_y, ep.query_x, 4)
    assert aug.shape == plain.shape
    torch.testing.assert_close(aug, plain, atol=1e-3, rtol=1e-3)   # logits are scaled by 1e4


def test_protonet_tta_is_the_mean_embedding_rule(proto_and_episode) -> None:
    """Averaged log-softmax over copies ranks classes as the distance from the mean query embedding to
    the prototype of all support copies does: the two differ by a per-query constant."""
    m, ep = proto_and_episode
    t = TestTimeAugment(m, 4)
    logp = t.predict(ep.support_x, ep.support_y, ep.query_x, 4)
    t.reset()                                # the same copies again, in predict's order (support, query)
    sc, qc = t._copies(ep.support_x), t._copies(ep.query_x)
    assert not torch.allclose(sc[:, 0], ep.support_x)          # the copies really are jittered
    with torch.no_grad():
        emb = lambda x: m.embed(x.flatten(0, -4)).view(*x.shape[:-3], -1)   # noqa: E731
        zs = torch.cat([emb(ep.support_x).unsqueeze(1), emb(sc)], 1)       # [B, V, S, D]
        zq = torch.cat([emb(ep.query_x).unsqueeze(1), emb(qc)], 1).mean(1)  # [B, Q, D]
        protos = prototypes(zs.flatten(1, 2), ep.support_y.repeat(1, 5), 4)
        ref = -distance(zq, protos, "sqeuclidean") * SCALE
    diff = logp - ref
    assert float((diff - diff.mean(-1, keepdim=True)).abs().max()) < 1e-3 * float(ref.abs().max())
    assert torch.equal(logp.argmax(-1), ref.argmax(-1))
    # support-only augmentation leaves the queries alone
    t_s = TestTimeAugment(m, 4, query=False)
    logp_s = t_s.predict(ep.support_x, ep.support_y, ep.query_x, 4)
    with torch.no_grad():
        ref_s = -distance(emb(ep.query_x), protos, "sqeuclidean") * SCALE
    torch.testing.assert_close(logp_s, ref_s.log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_chunked_calls_and_reset_reproduce(proto_and_episode, monkeypatch) -> None:
    m, ep = proto_and_episode
    t = TestTimeAugment(m, 2, seed=7)
    whole = t.predict(ep.support_x, ep.support_y, ep.query_x, 4)
    t.reset()
    monkeypatch.setattr(tta_mod, "IMAGES_PER_CALL", 1)      # one task per call
    chunked = t.predict(ep.support_x, ep.support_y, ep.query_x, 4)
    torch.testing.assert_close(chunked, whole)
    again = t.predict(ep.support_x, ep.support_y, ep.query_x, 4)   # no reset: new copies
    assert not torch.allclose(again, whole)


def test_evaluate_records_tta_and_repeats(proto_and_episode) -> None:
    m, _ = proto_and_episode
    ds = make_synthetic(n_classes=8, per_class=6, size=16)
    s = EpisodeSampler(ds, 4, 1, 3, seed=0)
    r1 = evaluate(with_tta(m, 2), s, 30, progress=False)
    r2 = evaluate(with_tta(m, 2), s, 30, progress=False)
    plain = evaluate(with_tta(m, 0), s, 30, progress=False)
    assert r1.tta == 2 and plain.tta == 0 and r1.accuracies == r2.accuracies
    assert "test-time augmentation x2" in str(r1) and "augmentation" not in str(plain)


def test_bad_uses() -> None:
    ds = make_synthetic(n_classes=8, per_class=6, size=16)
    with pytest.raises(FewshotError, match="at least 1 copy"):
        TestTimeAugment(methods.build("protonet", ds.image_shape, hidden=8), 0)
    proto = methods.build("protonet", ds.image_shape, hidden=8)
    x = torch.zeros(1, 2, *ds.image_shape)
    with pytest.raises(FewshotError, match="regression"):
        TestTimeAugment(proto, 2).predict(x, torch.zeros(1, 2), x)
    with pytest.raises(FewshotError, match="image tasks"):
        TestTimeAugment(proto, 2).predict(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long),
                                          torch.zeros(1, 2, 5))
    semi = methods.build("semisup", ds.image_shape, hidden=8)
    ep = EpisodeSampler(ds, 3, 1, 2, unlabeled=1).sample(2)
    with pytest.raises(FewshotError, match="also carry unlabeled_x"):
        TestTimeAugment(semi, 2).predict_episode(ep)


def test_cli_eval_predict_lake_with_tta(capsys, tmp_path: Path, image_root: Path, lake_zip: Path) -> None:
    from test_cli import SMALL
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "protonet", "--data", image_root, "--episodes", "4", "--val-every",
                           "0", "--out", run, "--tta", "2", *SMALL)
    assert rc == 0, err
    assert "test-time augmentation x2" in out                     # the run's setting reaches the final test
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "3", "--queries", "2", "--episodes", "10",
                           "--tta", "3", "--no-progress")
    assert rc == 0 and "test-time augmentation x3" in out, err
    assert json.loads((run / "eval" / "3w1s2q-seed0-tta3.json").read_text())["tta"] == 3
    rc, out, err = run_cli(capsys, "eval", run, "--ways", "3", "--queries", "2", "--episodes", "10",
                           "--tta", "0", "--no-progress")
    assert rc == 0 and "augmentation" not in out, err
    sup = tmp_path / "support"
    classes = support_folder(image_root, sup)
    query = sorted(classes[1].iterdir())[0]
    rc, out, err = run_cli(capsys, "predict", run, "--support", sup, "--query", query, "--tta", "4",
                           "--no-progress")
    assert rc == 0, err
    assert out.split("\t")[1] in {c.name for c in classes}
    rc, out, err = run_cli(capsys, "eval", run, "--lake-runs", lake_zip, "--tta", "2", "--no-progress")
    assert rc == 0 and "overall error rate" in out, err
    assert json.loads((run / "eval" / "lake_runs.json").read_text())["tta"] == 2
    rc, _, err = run_cli(capsys, "eval", run, "--tta", "-1", "--episodes", "5", "--no-progress")
    assert_one_line_error(rc, err, "--tta", "-1")
    shutil.rmtree(run)
