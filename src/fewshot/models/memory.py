"""External-memory building blocks: content addressing shared by the neural Turing machine and MANN, and the
rest of the neural Turing machine (Graves, Wayne & Danihelka 2014, "Neural Turing Machines", arXiv:1410.5401).

Shapes: memory ``M`` ``[B, N, W]`` (N slots of width W), one weighting per head ``w`` ``[B, H, N]``.
Addressing of one head at step t (section 3.3 of the paper):

1. content:       w^c(i) = softmax_i(beta K(k, M(i))),  K = cosine similarity, beta >= 0       (eq. 5-6)
2. interpolation: w^g = g w^c + (1 - g) w_{t-1},  g in [0, 1]                                  (eq. 7)
3. shift:         w~(i) = sum_j w^g(j) s(i - j)   (circular convolution, indices mod N)        (eq. 8)
4. sharpening:    w(i) = w~(i)^gamma / sum_j w~(j)^gamma,  gamma >= 1                          (eq. 9)

Read: r = sum_i w(i) M(i) (eq. 2). Write: erase, then add (eq. 3-4), M(i) <- M(i) (1 - w(i) e) + w(i) a.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError


def cosine_similarity(memory: torch.Tensor, keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """K(k, M_i) = k . M_i / (||k|| ||M_i||): memory ``[B, N, W]`` and keys ``[B, H, W]`` -> ``[B, H, N]``
    (norms clamped at ``eps``, so an all-zero row has similarity 0)."""
    mn = memory / memory.norm(dim=-1, keepdim=True).clamp_min(eps)
    kn = keys / keys.norm(dim=-1, keepdim=True).clamp_min(eps)
    return kn @ mn.transpose(1, 2)


def content_weights(memory: torch.Tensor, keys: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Content addressing w_c(i) = softmax_i(beta K(k, M_i)) (Graves et al. 2014, eq. 5-6): memory
    ``[B, N, W]``, keys ``[B, H, W]`` (one per head), key strengths ``beta`` ``[B, H]`` (>= 0) -> ``[B, H, N]``."""
    return (beta.unsqueeze(-1) * cosine_similarity(memory, keys)).softmax(-1)


def interpolate(content: torch.Tensor, previous: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Interpolation gate (eq. 7): w^g = g w^c + (1 - g) w_{t-1}; weightings ``[B, H, N]``, ``gate`` ``[B, H]``
    in [0, 1] (g = 1: pure content addressing; g = 0: keep the previous weighting, so the head can move
    by location alone)."""
    g = gate.unsqueeze(-1)
    return g * content + (1 - g) * previous


def circular_shift(weights: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Circular convolution with a shift weighting (eq. 8): w~(i) = sum_j w(j) s(i - j), indices modulo N.

    ``weights`` ``[B, H, N]``; ``shift`` ``[B, H, 2R + 1]`` is a distribution over the shifts ``-R..R`` (entry
    ``k`` is the weight of a move by ``k - R`` slots), so s = one-hot at +1 moves all the mass one slot
    forward (slot N-1 wraps to slot 0)."""
    n_shifts = shift.shape[-1]
    if n_shifts % 2 != 1:
        raise FewshotError(f"a shift weighting needs an odd number of entries (-R..R), got {n_shifts}")
    R = n_shifts // 2
    if 2 * R + 1 > weights.shape[-1]:
        raise FewshotError(f"shifts -{R}..{R} need at least {2 * R + 1} memory slots, got {weights.shape[-1]}")
    # gather the 2R+1 rotated copies at once: rolled[..., k, i] = w(i - (k - R))
    N = weights.shape[-1]
    idx = (torch.arange(N, device=weights.device).view(1, N) -
           torch.arange(-R, R + 1, device=weights.device).view(n_shifts, 1)) % N      # [2R+1, N]
    rolled = weights[..., idx]                                                       # [B, H, 2R+1, N]
    return (shift.unsqueeze(-1) * rolled).sum(-2)


def sharpen(weights: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """Sharpening (eq. 9): w(i) = w~(i)^gamma / sum_j w~(j)^gamma with ``gamma`` ``[B, H]`` >= 1, computed as
    softmax(gamma log w~) (stable; weights are clamped at ``eps`` so exact zeros stay ~0 with finite gradients)."""
    return (gamma.unsqueeze(-1) * weights.clamp_min(eps).log()).softmax(-1)


def address(memory: torch.Tensor, previous: torch.Tensor, key: torch.Tensor, beta: torch.Tensor,
            gate: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The whole addressing pipeline of section 3.3 (content, interpolation, shift, sharpening) for H heads:
    memory ``[B, N, W]``, previous weightings ``[B, H, N]``, keys ``[B, H, W]``, ``beta``/``gate``/``gamma``
    ``[B, H]``, ``shift`` ``[B, H, 2R+1]`` -> weightings ``[B, H, N]``."""
    w = content_weights(memory, key, beta)
    w = interpolate(w, previous, gate)
    w = circular_shift(w, shift)
    return sharpen(w, gamma)


def read(memory: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Read vectors r_h = sum_i w_h(i) M(i) (eq. 2): memory ``[B, N, W]``, weightings ``[B, H, N]`` -> ``[B, H, W]``."""
    return weights @ memory


def write(memory: torch.Tensor, weights: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Erase then add (eq. 3-4) for H write heads: memory ``[B, N, W]``, weightings ``[B, H, N]``, erase vectors
    ``[B, H, W]`` in [0, 1] and add vectors ``[B, H, W]`` -> the new memory ``[B, N, W]``.

    With several heads all erases are applied first, M~ = M prod_h (1 - w_h e_h^T), then all adds,
    M' = M~ + sum_h w_h a_h^T; products and sums commute, so the order of the heads does not matter (as the
    paper notes). With one head this is M' = M (1 - w e^T) + w a^T."""
    keep = (1 - weights.unsqueeze(-1) * erase.unsqueeze(-2)).prod(1)     # [B, N, W]
    return memory * keep + weights.transpose(1, 2) @ add


class NTMCell(nn.Module):
    """One step of a neural Turing machine with an LSTM controller (Graves et al. 2014), batched.

    At step t the controller LSTM reads ``[x_t, r_{t-1}]`` (the input and the previous read vectors) and
    emits h_t. A linear layer on h_t gives each head's parameters, squashed as in the paper's reference
    settings: key k = tanh, key strength beta = softplus, gate g = sigmoid, shift s = softmax over -R..R,
    gamma = 1 + softplus; write heads also get erase e = sigmoid and add a = tanh. The write heads address
    M_{t-1} and write (erase, then add) to give M_t; the read heads then address M_t and read r_t (eq. 2
    reads the current memory). The output is y_t = W_o [h_t, r_t] + b_o (logits).

    The initial state is learned: a memory bias M_0 (small random values, so content addressing can tell slots
    apart from the start), the initial read vectors r_0, the initial weightings w_0 of every head (softmax of
    learned logits, so they are distributions; initially ~96% on slot 0) and the controller's h_0, c_0.
    """

    def __init__(self, inputs: int, outputs: int, controller: int = 100, memory_size: int = 128,
                 memory_width: int = 20, read_heads: int = 1, write_heads: int = 1, shift_range: int = 1):
        super().__init__()
        for name, v, low in (("inputs", inputs, 1), ("outputs", outputs, 1), ("controller", controller, 1),
                             ("memory_size", memory_size, 1), ("memory_width", memory_width, 1),
                             ("read_heads", read_heads, 1), ("write_heads", write_heads, 0),
                             ("shift_range", shift_range, 0)):
            if int(v) < low:
                raise FewshotError(f"NTM {name} must be at least {low}, got {v}")
        if 2 * shift_range + 1 > memory_size:
            raise FewshotError(f"shift range {shift_range} needs at least {2 * shift_range + 1} memory slots, "
                               f"got {memory_size}")
        self.N, self.W, self.R, self.Hw = int(memory_size), int(memory_width), int(read_heads), int(write_heads)
        self.S = 2 * int(shift_range) + 1
        self.controller = nn.LSTMCell(inputs + self.R * self.W, controller)
        # per head: key W, beta 1, gate 1, shift S, gamma 1 (+ erase W, add W for write heads)
        self.address_size = self.W + 3 + self.S
        self.heads = nn.Linear(controller, (self.R + self.Hw) * self.address_size + self.Hw * 2 * self.W)
        self.output = nn.Linear(controller + self.R * self.W, outputs)
        # learned initial state
        self.memory0 = nn.Parameter(torch.empty(self.N, self.W).uniform_(-1, 1) / self.W ** 0.5)
        self.read0 = nn.Parameter(torch.randn(self.R, self.W) * 0.01)
        # every head starts (nearly) focused on slot 0, so location addressing has a definite place to move from
        logits0 = torch.zeros(self.R + self.Hw, self.N)
        logits0[:, 0] = 8.0
        self.weight0_logits = nn.Parameter(logits0)
        self.h0 = nn.Parameter(torch.zeros(controller))
        self.c0 = nn.Parameter(torch.zeros(controller))

    def initial_state(self, batch: int) -> dict:
        """The learned initial state expanded to ``batch`` sequences."""
        H = self.R + self.Hw
        return {"memory": self.memory0.unsqueeze(0).expand(batch, self.N, self.W),
                "reads": self.read0.unsqueeze(0).expand(batch, self.R, self.W),
                "weights": self.weight0_logits.softmax(-1).unsqueeze(0).expand(batch, H, self.N),
                "h": self.h0.unsqueeze(0).expand(batch, -1), "c": self.c0.unsqueeze(0).expand(batch, -1)}

    def _split(self, p: torch.Tensor) -> tuple:
        """Head parameters ``[B, H, address_size]`` -> (key, beta, gate, shift, gamma), squashed."""
        W, S = self.W, self.S
        key = torch.tanh(p[..., :W])
        beta = F.softplus(p[..., W])
        gate = torch.sigmoid(p[..., W + 1])
        shift = p[..., W + 2:W + 2 + S].softmax(-1)
        gamma = 1 + F.softplus(p[..., W + 2 + S])
        return key, beta, gate, shift, gamma

    def forward(self, x: torch.Tensor, state: dict) -> tuple:
        """One step: input ``x`` ``[B, inputs]`` and the state dict -> (logits ``[B, outputs]``, new state);
        the state's ``weights`` ``[B, R + Hw, N]`` hold the read heads first, then the write heads."""
        B = x.shape[0]
        h, c = self.controller(torch.cat([x, state["reads"].reshape(B, -1)], -1), (state["h"], state["c"]))
        p = self.heads(h)
        H, A = self.R + self.Hw, self.address_size
        addr = p[:, :H * A].view(B, H, A)
        key, beta, gate, shift, gamma = self._split(addr)
        prev, memory = state["weights"], state["memory"]
        R = self.R
        if self.Hw:
            ww = address(memory, prev[:, R:], key[:, R:], beta[:, R:], gate[:, R:], shift[:, R:], gamma[:, R:])
            ea = p[:, H * A:].view(B, self.Hw, 2 * self.W)
            memory = write(memory, ww, torch.sigmoid(ea[..., :self.W]), torch.tanh(ea[..., self.W:]))
        wr = address(memory, prev[:, :R], key[:, :R], beta[:, :R], gate[:, :R], shift[:, :R], gamma[:, :R])
        reads = read(memory, wr)
        weights = torch.cat([wr, ww], 1) if self.Hw else wr
        y = self.output(torch.cat([h, reads.reshape(B, -1)], -1))
        return y, {"memory": memory, "reads": reads, "weights": weights, "h": h, "c": c}

    def run(self, xs: torch.Tensor, state: Optional[dict] = None, record: bool = False) -> tuple:
        """Unroll over a batch of sequences ``[B, T, inputs]`` -> (logits ``[B, T, outputs]``, trace); with
        ``record`` the trace holds the read and write weightings over time, ``[B, T, R, N]`` and
        ``[B, T, Hw, N]`` (detached)."""
        B, T = xs.shape[:2]
        state = self.initial_state(B) if state is None else state
        ys, reads, writes = [], [], []
        for t in range(T):
            y, state = self(xs[:, t], state)
            ys.append(y)
            if record:
                w = state["weights"].detach()
                reads.append(w[:, :self.R])
                writes.append(w[:, self.R:])
        trace = {"state": state}
        if record:
            trace["read_weights"] = torch.stack(reads, 1)
            trace["write_weights"] = torch.stack(writes, 1)
        return torch.stack(ys, 1), trace


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
