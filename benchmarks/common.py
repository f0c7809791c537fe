"""Shared helpers for the benchmark scripts: where the data and the peers live, a table printer."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEWSHOT_SHARED", ROOT.parent / "shared"))
OMNIGLOT = SHARED / "data" / "omniglot"
ANCHORS = SHARED / "anchors"
PEERS_PYTHON = Path(os.environ.get("PEERS_VENV", Path.home() / ".venv-peers")) / "bin" / "python"
TEST_ALPHABETS = ["Korean", "Tagalog"]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{datetime.date.today().isoformat()}")


def table(rows: list, headers: list) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def run_peer(script: str, *args: str, env: dict | None = None, timeout: int = 3600) -> str | None:
    """Run one of ../shared/anchors' peer scripts with the peers' venv; None when it is not installed."""
    if not PEERS_PYTHON.exists() or not (ANCHORS / script).exists():
        return None
    p = subprocess.run([str(PEERS_PYTHON), script, *args], cwd=ANCHORS, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"peer {script} failed:\n{p.stderr[-2000:]}")
    return p.stdout.strip().splitlines()[-1]
