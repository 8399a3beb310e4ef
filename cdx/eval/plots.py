"""PNG figures of the diagnostics (cdx/eval/diagnostics.py), drawn with matplotlib's
Agg backend (no display needed). Every function writes one file and returns its path.

  similarity_figure({student: [Ls, Lt]}, path, bands)   layer-pair cosine heatmaps
  bins_figure({student: bins}, path)                   accuracy per similarity bin
  heatmaps_figure(images, prompts, {model: [N, s, s]}, path, image_size)
                                                       attention over each image
"""
from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from cdx.data import images as images_lib  # noqa: E402

DPI = 100


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  plt.close(fig)
  return path


def similarity_figure(matrices: dict[str, np.ndarray], path: str,
                      bands: dict[str, tuple[list, list]] | None = None) -> str:
  """One panel per student: cosine of student layer (rows) x teacher layer (columns),
  one colour scale for all; the matched pairs (student layer, teacher group) boxed."""
  values = np.concatenate([np.ravel(m) for m in matrices.values()])
  lo, hi = float(values.min()), float(values.max())
  fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8),
                           squeeze=False)
  for ax, (name, m) in zip(axes[0], matrices.items()):
    im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                   origin="lower", aspect="auto")
    for s, group in zip(*(bands or {}).get(name, ([], []))):
      ax.add_patch(plt.Rectangle((min(group) - 0.5, s - 0.5), len(group), 1, fill=False,
                                 edgecolor="white", linewidth=1.2))
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.suptitle("teacher-student visual-attention cosine", fontsize=10)
  return _save(fig, path)


def bins_figure(bins: dict[str, list[dict]], path: str) -> str:
  """Accuracy per similarity bin (x: the bin's mean similarity), one line per student."""
  fig, ax = plt.subplots(figsize=(5.0, 3.6))
  for name, rows in bins.items():
    x = [r["similarity"] for r in rows]
    y = [100 * r["accuracy"] for r in rows]
    ax.plot(x, y, marker="o", label=name)
  ax.set_xlabel("teacher-student attention similarity (bin mean)")
  ax.set_ylabel("accuracy, %")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("accuracy by similarity quantile", fontsize=10)
  return _save(fig, path)


def heatmaps_figure(images: list[str], prompts: list[str], grids: dict[str, np.ndarray],
                    path: str, image_size: int = 224) -> str:
  """A row per image: the image, then each model's attention grid over it (upsampled,
  blended; each panel its own colour scale), titled with the model name; the prompt
  under the image."""
  cols = 1 + len(grids)
  fig, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 2.9 * len(images)),
                           squeeze=False)
  for r, (image_path, prompt) in enumerate(zip(images, prompts)):
    pixels = np.asarray(images_lib.load_image(image_path).convert("RGB").resize(
        (image_size, image_size)))
    axes[r, 0].imshow(pixels)
    axes[r, 0].set_xlabel("\n".join(textwrap.wrap(prompt, 32)[:3]), fontsize=6)
    for c, (name, g) in enumerate(grids.items(), start=1):
      axes[r, c].imshow(pixels)
      seen = g[r][g[r] > 0]  # a dropped first patch (0) must not set the colour scale
      axes[r, c].imshow(g[r], cmap="jet", alpha=0.55, interpolation="nearest",
                        vmin=float(seen.min()) if seen.size else None,
                        extent=(0, image_size, image_size, 0))
      axes[r, c].set_title(name, fontsize=8)
    for ax in axes[r]:
      ax.set_xticks([])
      ax.set_yticks([])
  return _save(fig, path)
