"""Plots shared by the notebooks and the pipeline report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt


def plot_history(history, quality_label: str, path: str | Path | None = None):
    """Quality, prefill time, decode speed and weight memory by pipeline stage, side by side (memory,
    not parameter count, so that quantized stages show what they save). Stages not timed show no bar."""
    names = [s.stage for s in history]
    panels = [([s.quality for s in history], quality_label),
              ([s.prefill_ms for s in history], "prefill (ms, median)"),
              ([s.decode_tokens_per_s for s in history], "decode (tokens/s, median)"),
              ([s.weight_bytes / 1e6 for s in history], "weights (MB in memory)")]
    panels = [(values, label) for values, label in panels if any(v is not None for v in values)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6))
    for ax, (values, label) in zip(axes, panels):
        ax.bar(range(len(values)), [float("nan") if v is None else v for v in values], color="tab:blue")
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
