"""Figure helpers for methods' own plots (``Method.extra_plots``): matplotlib without a display, saving,
and the t-SNE of real and generated features. Imports nothing else of fewshot, so a method file can use it
without pulling in the plotting of runs (:mod:`fewshot.plot` records the files a method returns)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, out: Path) -> Path:
    """Lay out ``fig``, write it to ``out`` (folders created, 120 dpi), close it; returns ``out``."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def tsne_real_vs_hallucinated(real: torch.Tensor, real_y: torch.Tensor, fake: torch.Tensor, fake_y: torch.Tensor,
                              names: List[str], out: Path, title: str = "real vs hallucinated features",
                              seed: int = 0) -> Path:
    """One t-SNE of real features ``[R, D]`` (dots) and generated ones ``[F, D]`` (crosses), labels
    ``0..len(names)-1``; one colour per class for both kinds (data hallucination's plot)."""
    from sklearn.manifold import TSNE
    z = torch.cat([real.float().flatten(1), fake.float().flatten(1)]).numpy()
    perplexity = max(2.0, min(30.0, (len(z) - 1) / 3))
    e = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)
    er, ef = e[:len(real)], e[len(real):]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        c = cmap(i % cmap.N)
        r = (real_y == i).nonzero().flatten().numpy()
        f = (fake_y == i).nonzero().flatten().numpy()
        ax.scatter(er[r, 0], er[r, 1], s=16, color=c, marker="o", label=f"{name[:24]} (real)")
        ax.scatter(ef[f, 0], ef[f, 1], s=22, color=c, marker="x", label=f"{name[:24]} (hallucinated)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    return save_figure(plt, fig, out)
