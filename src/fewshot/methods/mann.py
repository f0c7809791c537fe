"""Memory-augmented neural network with least-recently-used access (Santoro et al. 2016, "Meta-learning
with memory-augmented neural networks", ICML), and the LSTM baseline with the same controller.

Episode protocol. A task's images (N classes, several images each) are shown one at a time in a random
order; at step t the network receives the image x_t together with the one-hot label of the *previous*
step y_{t-1} (zeros at t = 0) and outputs a class distribution p_t for x_t. The loss is the cross-entropy
summed over all steps. Class labels are a random permutation per task, so the network can only be right
about a class after it has seen one of its images with the label: accuracy at the 1st instance of a class is
chance, and it rises with the instance number k (the k-th time a class appears in the sequence).

Controller. An LSTM fed with [x_t, y_{t-1}, r_{t-1}] (image features, previous label, the H read vectors
of the previous step) gives h_t; each head h emits a key k_t = tanh(W_k h_t) and a scalar gate alpha_t.

Memory (N slots of width W, LRU access, §3 of the paper; indices i over slots, one key per head):

- read by content: w^r_t(i) = softmax_i(beta_t K(k_t, M_t(i))), K the cosine similarity, beta_t =
  softplus(W_b h_t) per head as in the NTM (``learn_strength``, the default) or a fixed ``key_strength``
  (the paper: beta = 1), r_t = sum_i w^r_t(i) M_t(i);
- usage: w^u_t = gamma w^u_{t-1} + sum_heads w^r_t + sum_heads w^w_t (``decay`` = gamma);
- least used: w^lu_t(i) = 1 if w^u_t(i) <= m(w^u_t, n) else 0, m(v, n) the n-th smallest entry of v and
  n = the number of read heads. Ties: exactly n slots are marked, the slots being ordered by usage and,
  among equal usages, by slot index (a stable sort), so the all-zero usage at the start marks slots
  0..n-1 rather than every slot;
- write: w^w_t = sigmoid(alpha_t) w^r_{t-1} + (1 - sigmoid(alpha_t)) w^lu_{t-1}; with several heads head h
  takes the h-th least-used slot as its one-hot w^lu (the heads' one-hots sum to the paper's w^lu_{t-1}),
  so heads never write their least-used share onto the same row;
- before writing, the rows marked by w^lu_{t-1} are set to zero (the single least-used row with one head);
  then M_t(i) = M_{t-1}(i) + sum_heads w^w_t(i) a_t, and the reads of step t use M_t. a_t = tanh(W_a h_t)
  is a separate add vector per head (``add_vector``, the default, as the NTM's add vector); the paper
  writes the read key itself, a_t = k_t (``add_vector: false``).

Why the defaults differ from the paper's letter (``--learn-strength false --add-vector false`` gives the
paper's exact model). With beta = 1 a softmax over 128 cosines in [-1, 1] cannot single out one slot
(a perfect match gets at most e^2 ~ 7 times the weight of the worst), and a written key is always the
best match of the step's own read. On held-out Omniglot classes (benchmarks/mann_omniglot.py, one CPU
thread) the paper's form had not started to bind labels after about 2 000 steps of 16 sequences, nor had
the learned strength alone after 1 300, while with both changes the loss began to fall at about step
1 100 and the 2nd-instance accuracy on held-out classes reached 65 % after 4 066 steps: BENCHMARKS.md has
the numbers.

Output: p_t = softmax(W_o [h_t, r_t_1..r_t_H] + b) for MANN, softmax(W_o h_t + b) for the LSTM baseline
(``memory: false`` or the registered name ``mann-lstm``). Paper sizes: LSTM of 200 units, memory 128 x 40,
4 read heads, 20x20 Omniglot images flattened (``encoder: flat``; ``encoder: conv4`` adds a small
convolutional encoder). Reported (Omniglot, 5 classes, one-hot labels): 36.4 / 82.8 / 91.0 / 94.9 / 98.1 %
at the 1st / 2nd / 3rd / 5th / 10th instance, against 24.4 / 49.5 / 55.3 / 63.6 / 62.5 % for the LSTM
(their table 1).
(The paper's string-label encoding for 15 classes is not implemented: labels are one-hot of size
``classes``.)

Inference on a labelled support (``predict``): the support is fed as a labelled sequence (its order
shuffled with a fixed seed, since training sequences are never class by class); each query is then one
more step continuing the support's final state, all queries in parallel (they never see each other), with
the label of the last support image as its previous-label input (``query_label: last``, exactly the input
the training protocol gives at that step) or zeros (``query_label: zero``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..episodes import Episode, EpisodeSampler
from ..errors import FewshotError
from ..models import Conv4
from ..models.memory import content_weights
from . import register
from .base import Method

ENCODERS = ("flat", "conv4")
QUERY_LABELS = ("last", "zero")
#: instance numbers Santoro et al. report
INSTANCES = (1, 2, 3, 5, 10)


# ------------------------------------------------------------------------------------------ LRU access
def least_used(usage: torch.Tensor, n: int) -> tuple:
    """The n least-used slots of usage ``[B, N]``: slot indices ``[B, n]`` (ascending usage, ties by lower
    slot index) and the indicator w^lu ``[B, N]`` (1 at those n slots, i.e. w^u(i) <= m(w^u, n) with ties at
    the n-th smallest value broken by slot index)."""
    if not 1 <= n <= usage.shape[-1]:
        raise FewshotError(f"cannot mark {n} least-used slots in a memory of {usage.shape[-1]}")
    slots = torch.sort(usage, dim=-1, stable=True).indices[..., :n]
    w_lu = torch.zeros_like(usage).scatter_(-1, slots, 1.0)
    return slots, w_lu


def usage_update(usage: torch.Tensor, read_w: torch.Tensor, write_w: torch.Tensor, decay: float) -> torch.Tensor:
    """w^u_t = gamma w^u_{t-1} + sum_h w^r_t + sum_h w^w_t: usage ``[B, N]``, weights ``[B, H, N]``."""
    return decay * usage + read_w.sum(1) + write_w.sum(1)


def write_weights(alpha: torch.Tensor, prev_read: torch.Tensor, lu_slots: torch.Tensor) -> torch.Tensor:
    """w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1} per head: gate logits ``[B, H]``,
    previous read weights ``[B, H, N]``, each head's least-used slot ``[B, H]`` -> ``[B, H, N]``."""
    g = torch.sigmoid(alpha).unsqueeze(-1)
    lu = F.one_hot(lu_slots, prev_read.shape[-1]).to(prev_read.dtype)
    return g * prev_read + (1 - g) * lu


def zero_rows(memory: torch.Tensor, w_lu: torch.Tensor) -> torch.Tensor:
    """Memory ``[B, N, W]`` with the rows marked by the indicator ``w_lu`` ``[B, N]`` set to zero."""
    return memory * (1 - w_lu).unsqueeze(-1)


def write_memory(memory: torch.Tensor, write_w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """M_t(i) = M(i) + sum_h w^w_h(i) k_h: memory ``[B, N, W]``, weights ``[B, H, N]``, keys ``[B, H, W]``."""
    return memory + write_w.transpose(1, 2) @ keys


def read_memory(memory: torch.Tensor, keys: torch.Tensor, beta: torch.Tensor) -> tuple:
    """Content read: weights w^r ``[B, H, N]`` = softmax(beta cos(k, M(i))) and reads r = w^r M ``[B, H, W]``."""
    w = content_weights(memory, keys, beta)
    return w, w @ memory


# ------------------------------------------------------------------------------------------ sequences
def make_sequence(x: torch.Tensor, y: torch.Tensor, classes: int, order: torch.Tensor) -> tuple:
    """The episode protocol: images ``x`` ``[B, T, ...]`` with labels ``y`` ``[B, T]`` reordered by ``order``
    ``[B, T]`` (a permutation per task) -> (images, labels, previous-label one-hots ``[B, T, classes]``, zeros
    at t = 0 and one_hot(y_{t-1}) after)."""
    if order.shape != y.shape:
        raise FewshotError(f"sequence order {tuple(order.shape)} does not match labels {tuple(y.shape)}")
    idx = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    xs, ys = x.gather(1, idx), y.gather(1, order)
    prev = torch.zeros(*ys.shape, classes, dtype=torch.float32, device=ys.device)
    if ys.shape[1] > 1:
        prev[:, 1:] = F.one_hot(ys[:, :-1], classes).float()
    return xs, ys, prev


def instance_numbers(y: torch.Tensor) -> torch.Tensor:
    """k for each step of label sequences ``[B, T]``: this is the k-th time (from 1) its label appears."""
    same = (y.unsqueeze(2) == y.unsqueeze(1))                          # [B, T, T]: y_t == y_s
    return torch.tril(same).sum(-1)                                    # count of s <= t with y_s == y_t


def random_orders(B: int, T: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniformly random permutation of ``0..T-1`` per task ``[B, T]``."""
    gen_dev = generator.device if generator is not None else device
    return torch.rand(B, T, generator=generator, device=gen_dev).argsort(1).to(device)


# ------------------------------------------------------------------------------------------ the network
@dataclass
class State:
    """Recurrent state: LSTM (h, c); memory, usage, previous read weights and reads (MANN only)."""
    h: torch.Tensor
    c: torch.Tensor
    memory: Optional[torch.Tensor] = None
    usage: Optional[torch.Tensor] = None
    read_w: Optional[torch.Tensor] = None
    reads: Optional[torch.Tensor] = None

    def repeat(self, m: int) -> "State":
        """Each task's state repeated ``m`` times (task-major): parallel continuations."""
        return State(*(None if t is None else t.repeat_interleave(m, 0) for t in
                       (self.h, self.c, self.memory, self.usage, self.read_w, self.reads)))


@register("mann")
class MANN(Method):
    """Memory-augmented network, LRU access (Santoro et al. 2016); memory: false = LSTM baseline."""

    @dataclass
    class Config:
        memory: bool = True             #: external memory (false: the LSTM baseline, same controller)
        classes: int = 5                #: size of the label one-hot and of the output (the most ways)
        controller: int = 200           #: LSTM units
        slots: int = 128                #: memory rows N
        width: int = 40                 #: memory row width W
        heads: int = 4                  #: read heads (= the number n of least-used slots)
        decay: float = 0.95             #: usage decay gamma
        key_strength: float = 1.0       #: fixed beta of the content read when learn_strength is false (paper: 1)
        learn_strength: bool = True     #: emit beta_t = softplus(.) per head (false: the paper's fixed beta)
        add_vector: bool = True         #: write a separate a_t = tanh(W_a h_t) (false: the paper writes k_t)
        encoder: str = "flat"           #: flat (pixels, as the paper) | conv4 (small conv encoder)
        hidden: int = 32                #: conv4 channels
        query_label: str = "last"       #: previous-label input of a query step: last support label | zero

    run_defaults = {"ways": 5, "shots": 5, "queries": 5, "batch": 16, "val_ways": 5, "val_shots": 1,
                    "val_queries": 15, "train": {"lr": 1e-3, "schedule": "none", "grad_clip": 10.0}}

    def __init__(self, config: "MANN.Config", in_shape):
        super().__init__(config, in_shape)
        c = config
        if c.encoder not in ENCODERS:
            raise FewshotError(f"unknown encoder {c.encoder!r}; choose from {', '.join(ENCODERS)}")
        if c.query_label not in QUERY_LABELS:
            raise FewshotError(f"unknown query_label {c.query_label!r}; choose from {', '.join(QUERY_LABELS)}")
        for k in ("classes", "controller", "slots", "width", "heads", "hidden"):
            if int(getattr(c, k)) < 1:
                raise FewshotError(f"{k} must be at least 1, got {getattr(c, k)}")
        if c.memory and c.heads > c.slots:
            raise FewshotError(f"{c.heads} heads need at least as many memory slots, got {c.slots}")
        if not 0.0 <= c.decay <= 1.0:
            raise FewshotError(f"decay (usage gamma) must be in [0, 1], got {c.decay}")
        if c.key_strength <= 0:
            raise FewshotError(f"key_strength must be positive, got {c.key_strength}")
        if c.encoder == "conv4":
            if len(self.in_shape) != 3 or min(self.in_shape[1:]) < 16:
                raise FewshotError(f"conv4 encoder needs images of at least 16x16 pixels, got shape {self.in_shape}")
            self.encoder = Conv4(self.in_shape[0], c.hidden)
            feat = self.encoder.out_dim(self.in_shape)
        else:
            self.encoder = nn.Flatten()
            feat = int(torch.Size(self.in_shape).numel())
        self.feat = feat
        reads = c.heads * c.width if c.memory else 0
        self.lstm = nn.LSTMCell(feat + c.classes + reads, c.controller)
        if c.memory:
            self.key = nn.Linear(c.controller, c.heads * c.width)
            self.gate = nn.Linear(c.controller, c.heads)
            if c.learn_strength:
                self.strength = nn.Linear(c.controller, c.heads)
            if c.add_vector:
                self.add = nn.Linear(c.controller, c.heads * c.width)
        self.out = nn.Linear(c.controller + reads, c.classes)

    # ---- recurrence
    def initial_state(self, B: int, device) -> State:
        c = self.config
        z = torch.zeros(B, c.controller, device=device)
        if not c.memory:
            return State(z, z.clone())
        return State(z, z.clone(), memory=torch.zeros(B, c.slots, c.width, device=device),
                     usage=torch.zeros(B, c.slots, device=device),
                     read_w=torch.zeros(B, c.heads, c.slots, device=device),
                     reads=torch.zeros(B, c.heads, c.width, device=device))

    def _step(self, feat: torch.Tensor, prev_label: torch.Tensor, s: State, trace: Optional[dict] = None) -> tuple:
        """One step: (output features [h_t, r_t] ``[B, U + H W]`` (h_t alone without memory), new state)."""
        c = self.config
        B = feat.shape[0]
        inp = [feat, prev_label] + ([s.reads.flatten(1)] if c.memory else [])
        h, cell = self.lstm(torch.cat(inp, -1), (s.h, s.c))
        if not c.memory:
            return h, State(h, cell)
        keys = torch.tanh(self.key(h)).view(B, c.heads, c.width)
        alpha = self.gate(h)
        if c.learn_strength:
            beta = F.softplus(self.strength(h))
        else:
            beta = torch.full((B, c.heads), float(c.key_strength), device=h.device)
        lu_slots, w_lu = least_used(s.usage, c.heads)                   # from w^u_{t-1}
        w_w = write_weights(alpha, s.read_w, lu_slots)
        values = torch.tanh(self.add(h)).view(B, c.heads, c.width) if c.add_vector else keys
        memory = write_memory(zero_rows(s.memory, w_lu), w_w, values)
        w_r, reads = read_memory(memory, keys, beta)
        usage = usage_update(s.usage, w_r, w_w, c.decay)
        if trace is not None:
            trace.setdefault("read", []).append(w_r.detach())
            trace.setdefault("write", []).append(w_w.detach())
            trace.setdefault("usage", []).append(usage.detach())
        return torch.cat([h, reads.flatten(1)], -1), State(h, cell, memory, usage, w_r, reads)

    def step(self, feat: torch.Tensor, prev_label: torch.Tensor, s: State, trace: Optional[dict] = None) -> tuple:
        """One time step: features ``[B, D]`` and previous-label one-hots ``[B, classes]`` -> (logits
        ``[B, classes]``, new state). ``trace`` (a dict of lists) collects read/write weights and usage."""
        z, s = self._step(feat, prev_label, s, trace)
        return self.out(z), s

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image features ``[B, T, ...] -> [B, T, D]`` (pixels flattened, or the conv encoder)."""
        B, T = x.shape[:2]
        if T == 0:
            return x.new_zeros(B, 0, self.feat)
        return self.encoder(x.flatten(0, 1)).view(B, T, -1)

    def run_sequence(self, feats: torch.Tensor, prev: torch.Tensor, state: Optional[State] = None,
                     trace: Optional[dict] = None) -> tuple:
        """Features ``[B, T, D]`` and previous labels ``[B, T, classes]`` -> (logits ``[B, T, classes]``
        in fp32, final state). The recurrence runs in fp32 even under bf16 autocast."""
        B, T = feats.shape[:2]
        with torch.autocast(feats.device.type, enabled=False):
            feats, prev = feats.float(), prev.float()
            s = state if state is not None else self.initial_state(B, feats.device)
            if T == 0:
                return feats.new_zeros(B, 0, self.config.classes), s
            out = []
            for t in range(T):
                z, s = self._step(feats[:, t], prev[:, t], s, trace)
                out.append(z)
            logits = self.out(torch.stack(out, 1))                        # one product for all steps
        return logits, s

    def _check_ways(self, ways: int) -> None:
        if ways > self.config.classes:
            raise FewshotError(f"this {self.name} network outputs {self.config.classes} classes; it cannot "
                               f"label {ways}-way tasks (train with --classes {ways} or more)")

    def sequence_logits(self, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, ways: int,
                        trace: Optional[dict] = None) -> tuple:
        """The episode protocol on images ``[B, T, ...]`` with labels ``[B, T]`` in ``order``: (logits
        ``[B, T, ways]``, labels in sequence order ``[B, T]``)."""
        self._check_ways(ways)
        xs, ys, prev = make_sequence(x, y, self.config.classes, order)
        logits, _ = self.run_sequence(self.encode(xs), prev, trace=trace)
        return logits[..., :ways], ys

    # ---- the contract
    def loss(self, episode: Episode):
        x = torch.cat([episode.support_x, episode.query_x], 1)
        y = torch.cat([episode.support_y, episode.query_y], 1)
        order = random_orders(y.shape[0], y.shape[1], device=y.device)
        logits, ys = self.sequence_logits(x, y, order, episode.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten())
        with torch.no_grad():
            right = (logits.argmax(-1) == ys).float()
            inst = instance_numbers(ys)
            metrics = {"ce": float(loss.detach()), "acc": float(right.mean())}
            for k in (1, 2, 5):
                m = inst == k
                if bool(m.any()):
                    metrics[f"acc_inst{k}"] = float(right[m].mean())
        return loss, metrics

    def predict(self, support_x, support_y, query_x, ways=None):
        ways = int(ways) if ways is not None else int(support_y.max()) + 1
        self._check_ways(ways)
        B, S = support_y.shape
        M = query_x.shape[1]
        c = self.config
        g = torch.Generator().manual_seed(0)
        order = random_orders(B, S, device=support_y.device, generator=g)
        xs, ys, prev = make_sequence(support_x, support_y, c.classes, order)
        _, state = self.run_sequence(self.encode(xs), prev)
        if M == 0:
            return query_x.new_zeros(B, 0, ways, dtype=torch.float32)
        q_prev = torch.zeros(B * M, c.classes, device=support_y.device)
        if c.query_label == "last" and S > 0:
            q_prev = F.one_hot(ys[:, -1], c.classes).float().repeat_interleave(M, 0)
        qf = self.encode(query_x).reshape(B * M, 1, -1)
        logits, _ = self.run_sequence(qf, q_prev.unsqueeze(1), state.repeat(M))
        return logits.view(B, M, -1)[..., :ways]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The controller's state h_1 for image x shown first (zero label, empty memory)."""
        feats = self.encode(x.unsqueeze(1))
        with torch.autocast(x.device.type, enabled=False):
            s = self.initial_state(x.shape[0], x.device)
            h, _ = self.lstm(torch.cat([feats[:, 0].float(), torch.zeros(x.shape[0], self.config.classes,
                                                                              device=x.device)]
                                       + ([s.reads.flatten(1)] if self.config.memory else []), -1), (s.h, s.c))
        return h

    # ---- analysis
    @torch.no_grad()
    def instance_accuracy(self, episodes: Iterable[Episode], instances: Sequence[int] = INSTANCES,
                          seed: int = 0) -> dict:
        """Accuracy by instance number on episodes (every image of each, support and query, in one random
        sequence per task drawn from ``seed``): ``{k: {"acc": %, "ci95": %, "n": sequences}}``, the mean
        over sequences of the per-sequence accuracy at the k-th instance of a class, +- 1.96 std/sqrt(n)
        (sequences where no class reaches k instances are left out of that k)."""
        from ..evaluate import mean_ci
        was = self.training
        self.eval()
        g = torch.Generator().manual_seed(seed)
        per = {int(k): [] for k in instances}
        try:
            for ep in episodes:
                x = torch.cat([ep.support_x, ep.query_x], 1)
                y = torch.cat([ep.support_y, ep.query_y], 1)
                order = random_orders(y.shape[0], y.shape[1], device=y.device, generator=g)
                logits, ys = self.sequence_logits(x, y, order, ep.ways)
                right = (logits.float().argmax(-1) == ys).float()
                inst = instance_numbers(ys)
                for k in per:
                    m = (inst == k).float()
                    cnt = m.sum(1)
                    ok = cnt > 0
                    per[k].extend(((right * m).sum(1)[ok] / cnt[ok] * 100).tolist())
        finally:
            self.train(was)
        out = {}
        for k, v in per.items():
            mean, ci, _ = mean_ci(v)
            out[k] = {"acc": mean, "ci95": ci, "n": len(v)}
        return out

    def evaluate_instances(self, dataset, episodes: int = 1000, ways: int = 5, per_class: int = 10,
                           seed: int = 0, batch: int = 25, instances: Sequence[int] = INSTANCES,
                           device=None) -> dict:
        """:meth:`instance_accuracy` on ``episodes`` sequences of ``ways`` classes x ``per_class`` images
        from ``dataset`` (fixed seed), as Santoro et al.'s table."""
        device = device or next(self.parameters()).device
        sampler = EpisodeSampler(dataset, ways, per_class, 0, batch=batch, device=device, seed=seed)

        def eps():
            left = episodes
            while left > 0:
                ep = sampler.sample(min(batch, left))
                left -= ep.batch
                yield ep
        return self.instance_accuracy(eps(), instances, seed=seed)

    @torch.no_grad()
    def extra_plots(self, run, dataset, out_dir) -> list:
        """``instance_accuracy.png``: accuracy by instance number 1..10 on held-out classes (200 sequences
        of 5 classes x 10 images, or fewer images where the classes are smaller); with memory also
        ``memory_access.png``: read and write weights and usage over one sequence."""
        from ..figures import pyplot, save_figure
        ways = min(self.config.classes, 5, len(dataset))
        per_class = int(min(10, int(dataset.counts.min())))
        ks = list(range(1, per_class + 1))
        res = self.evaluate_instances(dataset, episodes=200, ways=ways, per_class=per_class, instances=ks,
                                      device=run.device)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(ks, [res[k]["acc"] for k in ks], yerr=[res[k]["ci95"] for k in ks], marker="o", capsize=3,
                    label=self.name + ("" if self.config.memory else " (LSTM)"))
        ax.axhline(100 / ways, color="gray", ls="--", lw=1, label="chance")
        ax.set_xlabel("instance of the class in the sequence")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.set_title(f"{Path(run.path).name}: {ways} held-out classes x {per_class} images")
        written = [save_figure(plt, fig, Path(out_dir) / "instance_accuracy.png")]
        if self.config.memory:
            written.append(self._access_plot(run, dataset, ways, per_class, Path(out_dir) / "memory_access.png"))
        return written

    def _access_plot(self, run, dataset, ways, per_class, out: Path) -> Path:
        from ..figures import pyplot, save_figure
        was = self.training
        self.eval()
        try:
            ep = EpisodeSampler(dataset, ways, per_class, 0, device=run.device, seed=0).sample(1)
            order = random_orders(1, ep.support_y.shape[1], device=run.device,
                                  generator=torch.Generator().manual_seed(0))
            trace: dict = {}
            _, ys = self.sequence_logits(ep.support_x, ep.support_y, order, ways, trace=trace)
        finally:
            self.train(was)
        read = torch.stack(trace["read"], 0)[:, 0].sum(1).cpu()       # [T, N], summed over heads
        write = torch.stack(trace["write"], 0)[:, 0].sum(1).cpu()
        usage = torch.stack(trace["usage"], 0)[:, 0].cpu()
        used = (write.amax(0) > 0.05) | (read.amax(0) > 0.05)
        cols = used.nonzero().flatten() if bool(used.any()) else torch.arange(read.shape[1])
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), sharey=True)
        for ax, m, name in zip(axes, (read, write, usage), ("read weights", "write weights", "usage")):
            im = ax.imshow(m[:, cols].numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_title(f"{name} (summed over heads)" if name != "usage" else name)
            ax.set_xlabel(f"memory slot ({len(cols)} of {read.shape[1]} shown)")
            fig.colorbar(im, ax=ax, fraction=0.04)
        axes[0].set_ylabel("step (label of the image)")
        T = ys.shape[1]
        axes[0].set_yticks(range(T))
        axes[0].set_yticklabels([str(int(v)) for v in ys[0].cpu()], fontsize=5)
        fig.suptitle(f"{Path(run.path).name}: memory access over one sequence of {ways} held-out classes")
        return save_figure(plt, fig, out)


@register("mann-lstm")
class MANNLSTM(MANN):
    """LSTM baseline of Santoro et al. 2016: the MANN controller without external memory."""

    @dataclass
    class Config(MANN.Config):
        memory: bool = False            #: the LSTM baseline (true: MANN)

