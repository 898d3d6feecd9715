"""Plots shared by the notebooks and the pipeline report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt


def plot_history(history, quality_label: str, path: str | Path | None = None):
    """Quality, latency and weight memory by pipeline stage, side by side (memory, not parameter
    count, so that quantized stages show what they save)."""
    names = [s.stage for s in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [([s.quality for s in history], quality_label),
              ([s.latency_ms for s in history], "latency (ms, median)"),
              ([s.weight_bytes / 1e6 for s in history], "weights (MB in memory)")]
    for ax, (values, label) in zip(axes, panels):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right")
        ax.set_title(label)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def plot_recovery(stages, path: str | Path | None = None):
    """Validation loss against training tokens, one line per recovery round (``Stage.extra["recovery"]``)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for s in stages:
        tokens, losses = zip(*s.extra["recovery"]["validation_curve"])
        ax.plot(tokens, losses, marker="o", label=s.stage)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("recovery: the validation articles, evaluated during training")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def show_in(output, fig):
    """Show ``fig`` in an ipywidgets ``Output`` in place of what it showed; returns ``fig``.

    Closing the figure afterwards keeps the notebook from drawing it a second time.
    """
    from IPython.display import display

    fig.tight_layout()
    output.clear_output(wait=True)
    with output:
        display(fig)
    plt.close(fig)
    return fig
