"""The assistant's training curves, from the ``train_log.json`` an adapter carries: the forget
loss L_f and the retain loss L_r per optimizer step, against the convergence targets."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_train_log(adapter: str | os.PathLike) -> dict:
    return json.loads((Path(adapter) / "train_log.json").read_text())


def plot_convergence(logs: dict[str, dict], path: str | os.PathLike) -> Path:
    """One line per label (``label -> train_log``) on two panels, L_f on a log scale; the
    dashed lines are each run's targets."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (("loss_forget", "target_forget_loss", "L_f: forget NLL (nats)"),
              ("loss_retain", "target_retain_kl", "L_r: KL to uniform on retain rows"))
    for i, (label, log) in enumerate(logs.items()):
        steps = [s for s in log["steps"] if "loss_forget" in s and "loss_retain" in s]
        for ax, (key, target, title) in zip(axes, panels):
            ax.plot([s["step"] for s in steps], [s[key] for s in steps], color=f"C{i}",
                    linewidth=1, label=label)
            goal = log["config"].get(target)
            if goal:
                ax.axhline(goal, color=f"C{i}", linestyle="--", linewidth=0.8)
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.savefig(path, dpi=110)
    return Path(path)
