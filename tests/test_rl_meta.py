"""Meta-RL through the gradient-based family: MAML / Meta-SGD / CAVIA on RL task families, with the
trainer, the run directory and exact resume that every method has."""
import pytest
import torch

from fewshot import methods, tasks
from fewshot.config import RunConfig
from fewshot.errors import FewshotError
from fewshot.evaluate import evaluate
from fewshot.rl import meta as rlm
from fewshot.run import fit


def _cfg(method="maml", data="navigation2d:horizon=8", episodes=4, **options):
    cfg = RunConfig(method=method, data=data, shots=3, queries=3, batch=3, seed=0)
    cfg.options = {"backbone": "mlp", "mlp_hidden": [16], "bn": "none", "inner_lr": 0.1, **options}
    cfg.train.episodes, cfg.train.val_every, cfg.train.ckpt_every, cfg.train.lr = episodes, 0, 1, 0.01
    cfg.val_shots, cfg.val_queries = 3, 3
    return cfg


def _weights(run):
    return {k: v.clone() for k, v in run.method.state_dict().items()}


def test_maml_rl_resume_is_exact(tmp_path):
    full = fit(_cfg(), tmp_path / "full", progress=False)
    part = fit(_cfg(episodes=2), tmp_path / "part", progress=False)
    resumed = fit(_cfg(episodes=4), tmp_path / "part", resume=True, progress=False)
    assert part.train_result.steps == 2 and resumed.train_result.steps == 4
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,data", [("metasgd", "bandit:k=3,n=10"), ("cavia", "navigation2d:horizon=6"),
                                         ("fomaml", "bandit:k=2,n=5")])
def test_variants_train_on_rl_families(tmp_path, method, data):
    opts = {"context": 4} if method == "cavia" else {}
    run = fit(_cfg(method, data, episodes=2, **opts), tmp_path / method, progress=False)
    assert run.train_result.steps == 2
    rows = (tmp_path / method / "metrics.jsonl").read_text()
    assert '"return"' in rows


def test_meta_gradient_flows_through_the_adaptation():
    """Second order: the outer policy-gradient loss after one inner step depends on theta through
    theta' = theta - alpha * g(theta); its gradient differs from the first-order one."""
    fam = tasks.make("navigation2d:horizon=6", shots=4, queries=4, batch=2, seed=3)
    grads = {}
    for fo in (False, True):
        torch.manual_seed(0)
        m = methods.build("maml", fam.in_shape, outputs=fam.outputs, backbone="mlp", mlp_hidden=[8], bn="none",
                          first_order=fo)
        fam.generator.manual_seed(5)
        loss, metrics = m.loss(fam.sample())
        loss.backward()
        grads[fo] = torch.cat([p.grad.flatten() for p in m.parameters()])
        assert set(metrics) >= {"return", "return_pre", "query_loss"}
    assert not torch.allclose(grads[False], grads[True])


def test_evaluation_reports_returns_higher_is_better():
    fam = tasks.make("navigation2d:horizon=6", shots=2, queries=2, batch=2, seed=7)
    m = methods.build("maml", fam.in_shape, outputs=fam.outputs, backbone="mlp", mlp_hidden=[8], bn="none")
    res = evaluate(m, fam, 6, progress=False)
    assert res.metric == "return" and res.higher_is_better and res.score == res.mean < 0
    again = evaluate(m, fam, 6, progress=False)
    assert again.accuracies == res.accuracies                  # the same held-out tasks and rollouts
    out = rlm.evaluate_adaptation(m, fam, 5, steps=(0, 1, 2))
    assert set(out) == {0, 1, 2}


def test_rl_needs_no_batch_norm():
    fam = tasks.make("bandit:k=2,n=4", shots=2, queries=2, batch=2)
    m = methods.build("maml", fam.in_shape, outputs=fam.outputs, backbone="mlp", mlp_hidden=[8])
    with pytest.raises(FewshotError, match="--bn none"):
        m.loss(fam.sample())


def test_plot_draws_navigation_trajectories(tmp_path):
    from fewshot.plot import plot_run
    run = fit(_cfg(episodes=2), tmp_path / "nav", progress=False)
    names = {p.name for p in plot_run(run)}
    assert names == {"learning_curves.png", "navigation_trajectories.png"}


def test_cli_train_and_eval_print_returns_after_each_step(tmp_path, capsys):
    import yaml
    from fewshot.cli import main
    cfg = _cfg(episodes=2)
    cfg.test_episodes = 4
    recipe = tmp_path / "nav.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--out", str(out), "--no-progress"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("test: after")]
    assert [l.split(":")[1].strip() for l in lines] == [f"after {k} steps" for k in range(4)]
    assert main(["eval", str(out), "--episodes", "5", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(l.startswith(f"after {k} steps: return ") for k, l in enumerate(lines))
    assert "5 held-out tasks" in lines[0]
    # the same tasks and rollouts again
    assert main(["eval", str(out), "--episodes", "5", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
