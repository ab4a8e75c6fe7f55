"""k-SAE plots."""

from __future__ import annotations

import numpy as np


def plot_firing_histogram(firing_frequency, ax=None, title: str | None = None):
    """Seaborn histogram of log10 firing frequency (dead latents reported in the title)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    freq = np.asarray(firing_frequency, dtype=np.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    alive = freq[freq > 0]
    if len(alive):
        sns.histplot(x=np.log10(alive), bins=50, ax=ax)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(title or f"{len(freq)} latents, {np.mean(freq == 0):.1%} never fire")
    return ax
