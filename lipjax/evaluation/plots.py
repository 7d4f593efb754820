"""PNG figures of evaluation results (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np


def _pyplot():
  import matplotlib   # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=import-outside-toplevel
  return plt


def certified_accuracy_vs_eps(results: Dict, path: str) -> str:
  """Certified accuracy against eps for each bound, PGD accuracy for reference.

  The global bound's curve is continuous (its radius is valid at every eps up
  to the cap); the local bound is plotted at the evaluated radii.
  """
  plt = _pyplot()
  s, eps = results["summary"], np.asarray(results["eps"])
  fig, ax = plt.subplots(figsize=(5.5, 4))
  per = results["per_example"]
  if "global" in results["bounds"]:
    r = np.asarray(per["radius_global"])
    grid = np.linspace(0.0, s["radius"]["global"]["cap"], 200)
    ax.plot(grid, [100 * np.mean(r > g) for g in grid], "-", color="tab:orange",
            label="certified (global, from radii)")
    ax.plot(eps, [100 * a for a in s["certified"]["global"]["accuracy"]], "s",
            color="tab:orange")
  if "local" in results["bounds"]:
    ax.plot(eps, [100 * a for a in s["certified"]["local"]["accuracy"]], "o-",
            color="tab:blue", label="certified (local)")
  ax.plot(eps, [100 * a for a in s["pgd"]["accuracy"]], "^--", color="tab:green",
          label="PGD")
  ax.axhline(100 * s["clean_accuracy"], color="gray", lw=0.8, ls=":", label="clean")
  ax.set_xlabel("eps (l2)")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def ratio_histogram(results: Dict, path: str) -> Optional[str]:
  """Histogram of the per-example local / global bound ratio (tightness run)."""
  per = results["per_example"]
  if "tightness_local_over_global" not in per:
    return None
  plt = _pyplot()
  r = np.asarray(per["tightness_local_over_global"], np.float64)
  r = r[np.isfinite(r)]
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.hist(r, bins=40, color="tab:blue", alpha=0.8)
  ax.set_xlabel("local bound / global bound")
  ax.set_ylabel("examples")
  ax.set_title(f"eps = {results['summary']['tightness']['eps']:g}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def read_metrics(path: str) -> List[Dict]:
  """Reads a ``metrics.jsonl`` file (one JSON object per line; bad lines skipped)."""
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(obj, dict):
        rows.append(obj)
  return rows


def training_curves(metrics_path: str, path: str) -> Optional[str]:
  """Training curves (every numeric metric against step, train and val) from metrics.jsonl."""
  if not os.path.exists(metrics_path):
    return None
  rows = [r for r in read_metrics(metrics_path) if "step" in r]
  if not rows:
    return None
  skip = {"step", "epoch", "split"}
  names = sorted({k for r in rows for k, v in r.items()
                  if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)})
  if not names:
    return None
  plt = _pyplot()
  cols = min(3, len(names))
  nrows = -(-len(names) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
  for ax, name in zip(axes.ravel(), names):
    for split in sorted({str(r.get("split", "train")) for r in rows}):
      pts = [(r["step"], r[name]) for r in rows
             if str(r.get("split", "train")) == split and isinstance(r.get(name), (int, float))]
      if pts:
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, "-" if len(pts) > 1 else "o", label=split)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes.ravel()[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_all(results: Dict, output_dir: str, metrics_path: Optional[str] = None) -> Dict:
  """Writes every figure that has data; returns ``{name: path}``."""
  os.makedirs(output_dir, exist_ok=True)
  out = {"certified_vs_eps": certified_accuracy_vs_eps(
      results, os.path.join(output_dir, "certified_vs_eps.png"))}
  h = ratio_histogram(results, os.path.join(output_dir, "local_over_global_hist.png"))
  if h:
    out["local_over_global_hist"] = h
  if metrics_path:
    c = training_curves(metrics_path, os.path.join(output_dir, "training_curves.png"))
    if c:
      out["training_curves"] = c
  return out
