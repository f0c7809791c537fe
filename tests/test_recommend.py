"""fewshot.recommend: the rule of thumb, the shipped measured tables (in sync with BENCHMARKS.md), the nearest
measured setting, the disagreement report, --measure, and bad input."""
from __future__ import annotations

from pathlib import Path

import pytest

import fewshot as fs
from fewshot.cli import main
from fewshot.errors import FewshotError
from fewshot.recommend import measured_answer, rule_of_thumb, shipped_tables, tables_from_markdown

from conftest import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_tables_agree_with_benchmarks_md() -> None:
    shipped = shipped_tables()
    assert shipped == tables_from_markdown((ROOT / "BENCHMARKS.md").read_text()), \
        "run python benchmarks/recommend_tables.py"
    key = {(e["method"], e["ways"], e["shots"], e["mean"], e["ci95"], e["minutes"]) for e in shipped}
    assert ("protonet", 5, 1, 97.52, 0.24, 29.0) in key          # the protonet recipe, plain
    assert ("relation", 5, 5, 41.09, 1.02, 4.0) in key            # the metric table, 4 minutes
    assert ("maml", 5, 1, 95.67, 0.32, 60.0) in key
    assert not any(e["method"] == "semisup" for e in shipped)      # its test episodes are another task


def test_rule_of_thumb_thresholds() -> None:
    assert rule_of_thumb(4, 10 ** 6)[0] == "protonet"
    assert rule_of_thumb(1, 10)[0] == "protonet"                   # shots are checked first
    assert rule_of_thumb(5, 999)[0] == "relation"
    assert rule_of_thumb(5, 1000)[0] == "maml"


MD = """# B
## Metric methods on Omniglot minimal sets, unseen alphabets, same training time
```
| method | training (time / steps) | 5-way 1-shot | 20-way 1-shot |
|---|---|---|---|
| relation | 2.5 min / 100 | 80.00 ± 1.00 | 50.00 ± 0.50 |
| easyfsl prototypical | 4.0 min | 99.00 ± 0.10 | 90.00 ± 0.10 |
```
| prototypical (loose table, not a recorded output) | 1 min | 99.99 ± 0.01 | 99.99 ± 0.01 |
## MAML on Omniglot minimal sets, unseen alphabets
```
| test | fewshot maml (%) | episodes |
|------|------------------|----------|
| 5-way 1-shot | 90.50 ± 0.40 | 1000 |
```
## Some other section
```
| method | 5-way 1-shot |
|---|---|
| prototypical | 100.00 ± 0.00 |
```
"""


def test_tables_from_markdown_reads_both_layouts() -> None:
    got = {(e["method"], e["ways"], e["shots"], e["mean"], e["ci95"], e["minutes"]) for e in tables_from_markdown(MD)}
    assert got == {("relation", 5, 1, 80.0, 1.0, 2.5), ("relation", 20, 1, 50.0, 0.5, 2.5),
                   ("maml", 5, 1, 90.5, 0.4, 60.0)}                # peers, loose tables, other sections: out


def test_measured_answer_nearest_setting_and_budget() -> None:
    entries = tables_from_markdown(MD)
    m = measured_answer(5, 2, entries=entries)
    assert (m["ways"], m["shots"], m["exact"]) == (5, 1, False)
    assert [e["method"] for e in m["ranked"]] == ["maml", "relation"]
    assert [e["method"] for e in measured_answer(5, 1, minutes=10, entries=entries)["ranked"]] == ["relation"]
    assert measured_answer(30, 1, entries=entries)["ways"] == 20
    assert "no recorded run" in measured_answer(5, 1, minutes=1, entries=entries)["budget_note"]


def test_recommend_reports_the_disagreement() -> None:
    ds = make_synthetic(n_classes=12, per_class=10, size=16)
    rec = fs.recommend(ds, ways=5, shots=5)
    assert rec.train_examples < 1000 and rec.rule == "relation"
    assert rec.best_measured == "protonet" and not rec.agree
    text = str(rec)
    assert "rule of thumb: relation" in text and "measured: protonet" in text and "disagree:" in text
    assert "cannot test it" in text                               # recorded runs all had 3700 training images
    one = fs.recommend(ds, ways=5, shots=1)
    assert one.rule == "protonet" and one.agree and "agree: protonet is also the best" in str(one)


def test_recommend_measure_ranks_on_the_same_episodes(tmp_path) -> None:
    ds = make_synthetic(n_classes=12, per_class=10, size=16)
    with pytest.raises(FewshotError, match="holds out 2, fewer than --ways 3"):
        fs.recommend(ds, ways=3, shots=1, measure=True)
    rec = fs.recommend(ds, ways=3, shots=1, minutes=0.02, measure=True, candidates=["protonet", "relation"],
                       split="fraction:0.5", episodes=20, out=tmp_path)
    assert sorted(t["method"] for t in rec.trials) == ["protonet", "relation"]
    assert all(t["n"] == 20 and t["steps"] >= 1 and t["train_s"] <= 3 for t in rec.trials)
    assert rec.trials[0]["mean"] >= rec.trials[1]["mean"]
    assert "measured on" in str(rec)


def test_cli_recommend_and_bad_ways(image_root, capsys) -> None:
    assert main(["recommend", "--data", str(image_root), "--ways", "5", "--shots", "1"]) == 0
    out = capsys.readouterr().out
    assert "rule of thumb: protonet" in out and "measured: " in out
    assert main(["recommend", "--data", str(image_root), "--ways", "17", "--shots", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--ways 17 is more than the 16 classes" in err
    with pytest.raises(FewshotError, match="--shots must be at least 1"):
        fs.recommend(str(image_root), ways=2, shots=0)
