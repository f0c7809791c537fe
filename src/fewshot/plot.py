"""``fewshot plot RUN``: learning curves and a t-SNE picture of held-out class embeddings (PNG); task families
get their own pictures (:data:`FAMILY_FIGURES`; sine: adaptation; copy: input, output and the memory attention
over time; 2-D navigation: trajectories before and after adaptation)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from .data.images import to_float
from .figures import pyplot, save_figure, tsne_real_vs_hallucinated  # noqa: F401  (methods' helpers)


def _plt():
    return pyplot()


def _save(plt, fig, out: Path) -> Path:
    save_figure(plt, fig, out)
    from .rundir import record
    record(out)                 # a file fewshot wrote in the run folder (replaced by --overwrite)
    return out


def learning_curves(run_dir: Path, out: Path) -> Optional[Path]:
    """Training loss/accuracy (smoothed) and validation accuracy +- CI against the step."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    tr = [r for r in rows if r.get("kind") == "train"]
    va = [r for r in rows if r.get("kind") == "val"]
    if not tr:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in tr]

    def smooth(v, k=max(1, len(tr) // 50)):
        out, acc = [], 0.0
        for i, x in enumerate(v):
            acc += x
            if i >= k:
                acc -= v[i - k]
            out.append(acc / min(i + 1, k))
        return out
    axes[0].plot(steps, [r["loss"] for r in tr], alpha=0.3, color="C0")
    axes[0].plot(steps, smooth([r["loss"] for r in tr]), color="C0", label="train loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    if all(r["loss"] > 0 for r in tr):
        axes[0].set_yscale("log")           # (a policy-gradient surrogate can be negative: linear then)
    axes[0].legend()
    regression = "mse" in tr[0]
    bits = "bits" in tr[0]          # copy task: bits wrong per sequence (lower is better)
    rl = "return" in tr[0]          # RL task families: return after adaptation (higher is better)
    if rl:
        axes[1].plot(steps, smooth([r["return"] for r in tr]), color="C0", label="train tasks, after adaptation")
        if "return_pre" in tr[0]:
            axes[1].plot(steps, smooth([r["return_pre"] for r in tr]), color="C0", ls="--",
                         label="train tasks, before adaptation")
    elif bits:
        axes[1].plot(steps, smooth([r["bits"] for r in tr]), color="C0", label="train sequences")
    elif regression:
        axes[1].plot(steps, smooth([r["mse"] for r in tr]), color="C0", label="train tasks (query MSE)")
    else:
        axes[1].plot(steps, smooth([100 * r["acc"] for r in tr]), color="C0", label="train episodes")
    if va:
        axes[1].errorbar([r["step"] for r in va], [r["val_acc"] for r in va], yerr=[r["val_ci"] for r in va],
                         color="C1", marker="o", capsize=3,
                         label="validation (held-out tasks)" if regression or bits or rl else
                         "validation (held-out classes)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("return" if rl else "bits wrong per sequence" if bits else "MSE" if regression
                       else "accuracy (%)")
    axes[1].legend()
    fig.suptitle(f"{run_dir.name}: learning curves")
    return _save(plt, fig, out)


@torch.no_grad()
def tsne_embeddings(run, ds, out: Path, max_classes: int = 10, per_class: int = 20, seed: int = 0) -> Path:
    """t-SNE of the method's embeddings of up to ``max_classes`` held-out classes."""
    from sklearn.manifold import TSNE
    g = torch.Generator().manual_seed(seed)
    n = min(max_classes, len(ds))
    classes = torch.randperm(len(ds), generator=g)[:n].tolist()
    xs, ys = [], []
    for i, c in enumerate(classes):
        imgs = ds.images(c)[:per_class]
        xs.append(imgs)
        ys += [i] * len(imgs)
    x = to_float(torch.cat(xs)).to(run.device)
    z = torch.cat([run.method.embed(x[i:i + 256]).float().flatten(1).cpu() for i in range(0, len(x), 256)])
    perplexity = max(2.0, min(30.0, (len(z) - 1) / 3))
    e = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z.numpy())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    for i, c in enumerate(classes):
        m = [j for j, y in enumerate(ys) if y == i]
        ax.scatter(e[m, 0], e[m, 1], s=14, color=cmap(i % cmap.N), label=ds.names[c][:28])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {run.method.name} embeddings: {n} held-out classes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    return _save(plt, fig, out)


def sine_adaptation(run, out: Path, shots: int = 10, tasks_shown: int = 3, seed: int = 0) -> Path:
    """For sine runs: the true curve, the K support points, and the model before and after adaptation."""
    from . import tasks
    from .run import FAMILY_SEEDS
    method = run.method
    if not method.adapts_by_gradient:
        from .errors import FewshotError
        raise FewshotError(f"method {method.name} does not adapt by gradient steps; nothing to plot for sine")
    fam = tasks.make("sine", shots, 1, batch=tasks_shown, device=run.device, seed=FAMILY_SEEDS["test"] + seed)
    ep = fam.sample()
    grid = torch.linspace(*fam.x_range, 200, device=run.device).view(1, -1, 1).expand(tasks_shown, -1, -1)
    truth = fam.curve(grid, ep.extra["amplitude"], ep.extra["phase"])
    with torch.no_grad():
        before = method.predict(ep.support_x, ep.support_y, grid, steps=0).float()
        after = method.predict(ep.support_x, ep.support_y, grid).float()
    steps = method.config.test_steps or method.config.inner_steps
    plt = _plt()
    fig, axes = plt.subplots(1, tasks_shown, figsize=(4.2 * tasks_shown, 3.6), squeeze=False)
    g = grid[0, :, 0].cpu()
    for i, ax in enumerate(axes[0]):
        ax.plot(g, truth[i, :, 0].cpu(), color="k", lw=1.5, label="true curve")
        ax.plot(g, before[i, :, 0].cpu(), color="C0", ls="--", label="before adaptation")
        ax.plot(g, after[i, :, 0].cpu(), color="C3", label=f"after {steps} step(s)")
        ax.scatter(ep.support_x[i, :, 0].cpu(), ep.support_y[i, :, 0].cpu(), color="C2", zorder=3,
                   label=f"{shots} support points")
        ax.set_title(f"A = {float(ep.extra['amplitude'][i]):.2f}, phase = {float(ep.extra['phase'][i]):.2f}")
        ax.set_xlabel("x")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{run.path.name}: {method.name} on held-out sine tasks")
    return _save(plt, fig, out)


@torch.no_grad()
def copy_task_figure(run, out: Path, data: Optional[str] = None, seed: int = 0) -> Path:
    """For copy-task runs: one held-out sequence (of the longest length of ``data``, default the run's
    family) with its input, target and output (sigmoid) over time, and, for methods with an external memory
    (the NTM), the read and write weightings over the memory slots at every step."""
    from . import tasks
    from .run import FAMILY_SEEDS
    fam = tasks.make(data or run.config.data, 1, 1, batch=1, device=run.device, seed=FAMILY_SEEDS["test"] + seed)
    ep = fam.sample(length=fam.max_length)
    logits, trace = run.method.sequence_logits(ep.query_x, record=True)
    x, y = ep.query_x[0].cpu(), ep.query_y[0].cpu()
    prob = logits[0].float().sigmoid().cpu()
    T, L = x.shape[0], y.shape[0]
    wrong = int(fam.score(logits, ep)[0])
    target = torch.full((T, y.shape[1]), float("nan"))
    target[T - L:] = y
    panels = [("input (bits + delimiter)", x), ("target", target), (f"output ({wrong} bits wrong)", prob)]
    for key, label in (("read_weights", "read"), ("write_weights", "write")):
        w = trace.get(key)
        if w is not None:
            for h in range(w.shape[2]):
                panels.append((f"{label} weighting, head {h + 1}", w[0, :, h].float().cpu()))
    plt = _plt()
    heights = [max(2.0, min(4.0, p[1].shape[1] / 16)) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, T / 6), sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    bits_cmap = plt.get_cmap("gray_r").with_extremes(bad="#d8dce8")     # grey: steps without a target
    for ax, (title, img) in zip(axes[:, 0], panels):
        slots = "weighting" in title
        ax.imshow(img.T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis" if slots else bits_cmap,
                  vmin=0, vmax=1 if not slots else float(img.max()))
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("memory slot" if slots else "channel", fontsize=8)
    axes[-1, 0].set_xlabel("time step")
    fig.suptitle(f"{run.path.name}: {run.method.name} on a length-{L} copy", fontsize=10)
    return _save(plt, fig, out)


@torch.no_grad()
def navigation_trajectories(run, out: Path, data: Optional[str] = None, goals: int = 3, steps: int = 3,
                            seed: int = 0) -> Path:
    """For 2-D navigation runs (the MAML paper's Fig. 4): on a few held-out goals, one rollout of the policy
    before adaptation and after each of ``steps`` policy-gradient steps (each on the run's number of
    rollouts per inner step), with the goal marked."""
    from . import tasks
    from .errors import FewshotError
    from .rl.meta import adaptation_rollouts
    from .run import FAMILY_SEEDS
    method = run.method
    if not method.adapts_by_gradient:
        raise FewshotError(f"method {method.name} does not adapt by gradient steps; nothing to plot")
    fam = tasks.make(data or run.config.data, run.config.shots, 1, device=run.device,
                     seed=FAMILY_SEEDS["test"] + seed, split="test")
    goal = fam.env.sample_tasks(goals, fam.generator)
    was = method.training
    method.eval()
    try:
        trajs, _, _ = adaptation_rollouts(method, fam.env, goal, steps, fam.shots, fam.generator,
                                          method.config.discount)
    finally:
        method.train(was)
    plt = _plt()
    fig, axes = plt.subplots(1, goals, figsize=(4.0 * goals, 4.0), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for k, traj in enumerate(trajs):
            n = int(traj.mask[i, 0].sum())
            pos = traj.obs[i, 0, :, :2].cpu()          # (navigation2d:goal=1 observes the goal after it)
            path = torch.cat([torch.zeros(1, 2), pos[1:n], pos[n - 1:n]
                              + traj.actions[i, 0, n - 1:n].cpu().clamp(-fam.env.max_speed, fam.env.max_speed)])
            ax.plot(path[:, 0], path[:, 1], color=f"C{k}", lw=1.2,
                    label=("before adaptation" if k == 0 else f"after {k} step{'s' if k > 1 else ''}")
                    + f" (return {float(traj.returns[i, 0]):.1f})")
        g = goal["goal"][i].cpu()
        ax.scatter([0], [0], marker="o", color="k", zorder=3)
        ax.scatter([g[0]], [g[1]], marker="*", s=150, color="gold", edgecolor="k", zorder=4, label="goal")
        lim = fam.env.goal_range * 1.4
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{run.path.name}: {method.name} on held-out goals (one rollout each)")
    return _save(plt, fig, out)


#: task families with a figure of their own: family name -> (file name, figure function(run, out, data))
FAMILY_FIGURES = {
    "sine": ("sine_adaptation.png", lambda run, out, data: sine_adaptation(run, out, shots=run.config.shots)),
    "copy": ("copy_task.png", lambda run, out, data: copy_task_figure(run, out, data=data)
             if run.method.labels_sequences else None),
    "navigation2d": ("navigation_trajectories.png",
                     lambda run, out, data: navigation_trajectories(run, out, data=data)),
}


def plot_run(run, data: Optional[str] = None, max_classes: int = 10) -> List[Path]:
    """Write the run's plots under ``RUN/plots``; returns the files written."""
    from . import tasks
    from .methods.base import Method
    from .rundir import record
    from .run import task_family, test_classes
    out_dir = Path(run.path) / "plots"
    written = []
    lc = learning_curves(Path(run.path), out_dir / "learning_curves.png")
    if lc:
        written.append(lc)
    family = task_family(run, data)
    if family is not None:
        name, figure = FAMILY_FIGURES.get(tasks.family_name(family), (None, None))
        path = figure(run, out_dir / name, family) if figure else None
        return written + ([path] if path else [])
    ds = test_classes(run, data)
    if type(run.method).embed is not Method.embed:
        written.append(tsne_embeddings(run, ds, out_dir / "tsne_test_classes.png", max_classes=max_classes))
    extra = list(run.method.extra_plots(run, ds, out_dir))
    for path in extra:                  # fewshot's files in the run folder, for --overwrite
        record(path)
    return written + extra
