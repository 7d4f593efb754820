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


def certified_accuracy_vs_eps(results: Dict, path: str, title: Optional[str] = None) -> str:
  """Certified accuracy against eps for each bound, PGD accuracy for reference.

  Every series has a marker at each evaluated eps; the x axis ends at the
  largest one. The global bound is also drawn as a continuous line from
  its per-example radii (a global certificate holds at every radius up to
  the example's radius), up to the largest evaluated eps and no further.

  Args:
    results: the dict of :func:`lipjax.evaluation.evaluate`.
    path: the PNG to write.
    title: the figure's title (e.g. data set, model, checkpoint step); the
      number of examples is appended.
  """
  fig = certified_figure(results, title)
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)
  return path


def certified_figure(results: Dict, title: Optional[str] = None):
  """The matplotlib figure of :func:`certified_accuracy_vs_eps` (not saved)."""
  plt = _pyplot()
  s, eps = results["summary"], np.asarray(results["eps"], np.float64)
  top = float(eps.max())
  fig, ax = plt.subplots(figsize=(6, 4.2))
  per = results["per_example"]
  if "global" in results["bounds"]:
    # Radii are capped at the largest eps, so the line stops just before it
    # and ends at the certificate evaluated there.
    r = np.asarray(per["radius_global"], np.float64)
    grid = np.linspace(0.0, top, 200)[:-1]
    curve = [100 * np.mean(r > g) for g in grid]
    grid = np.append(grid, top)
    curve.append(100 * s["certified"]["global"]["accuracy"][-1])
    ax.plot(grid, curve, "-", color="tab:orange", lw=1.2, alpha=0.7,
            label="certified (global), from radii")
    ax.plot(eps, [100 * a for a in s["certified"]["global"]["accuracy"]], "s", ms=7,
            mfc="none", mew=1.5, color="tab:orange", label="certified (global) at eps")
  if "local" in results["bounds"]:
    ax.plot(eps, [100 * a for a in s["certified"]["local"]["accuracy"]], "o-", ms=4,
            color="tab:blue", label="certified (local) at eps")
  ax.plot(eps, [100 * a for a in s["pgd"]["accuracy"]], "^--", ms=5, color="tab:green",
          label="PGD at eps")
  ax.axhline(100 * s["clean_accuracy"], color="gray", lw=0.8, ls=":", label="clean")
  ax.set_xlabel("eps (l2 radius)")
  ax.set_ylabel("accuracy (%)")
  ax.set_xlim(0, top * 1.03)
  ax.set_ylim(0, 100)
  ax.set_xticks(sorted(set([0.0] + [float(e) for e in eps])))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  n = s["num_examples"]
  ax.set_title(f"{title + ': ' if title else ''}{n} examples", fontsize=9)
  fig.tight_layout()
  return fig


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


# Records of metrics.jsonl that are bookkeeping, not curves.
_NOT_CURVES = ("step", "epoch", "split", "checkpoint_step", "bound", "eps",
               "max_failure_probability", "test_max_failure_probability", "kappa")
_ACCURACY = (("train", "accuracy", "train accuracy (batches)", "-", "tab:blue"),
             ("train", "vra_estimate", "train certified at eps_train (estimate)", "-",
              "tab:cyan"),
             ("val", "val_clean_accuracy", "val clean", "o-", "tab:green"),
             ("val", "val_certified_accuracy", "val certified", "s-", "tab:red"))


def _series(rows, split, name):
  pts = sorted((r["step"], float(r[name])) for r in rows
               if str(r.get("split", "train")) == split
               and isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool))
  return pts


def _varies(pts) -> bool:
  values = [v for _, v in pts]
  return len(values) > 1 and max(values) - min(values) > 1e-12 * max(1.0, abs(max(values)))


def training_curves(metrics_path: str, path: str, title: Optional[str] = None) -> Optional[str]:
  """Training curves from a run's ``metrics.jsonl``.

  Panels: the training loss; accuracy (train, the training step's certified
  estimate, validation clean and certified, and the final test values as
  single markers at the checkpoint they were measured on, on a 0-1 axis);
  the eps schedule, with the learning rate (log scale) when it changes; the
  bound diagnostics of every validation (training estimate / sound local
  bound, median and q10, and the units each layer's masks keep). Other
  numeric training metrics get a panel each when they change; bookkeeping
  fields (checkpoint step, failure probability, kappa, which follows the eps
  ramp) and constant series are left out.
  """
  if not os.path.exists(metrics_path):
    return None
  fig = training_figure(read_metrics(metrics_path), title)
  if fig is None:
    return None
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)
  return path


def training_figure(records: List[Dict], title: Optional[str] = None):
  """The figure of :func:`training_curves` from metrics records (None: nothing to plot)."""
  rows = [r for r in records if "step" in r]
  if not rows:
    return None
  plt = _pyplot()
  panels = []
  loss = _series(rows, "train", "loss")
  if loss:
    panels.append("loss")
  acc = [(spec, _series(rows, spec[0], spec[1])) for spec in _ACCURACY]
  tests = [r for r in rows if r.get("split") == "test"]
  if any(pts for _, pts in acc) or tests:
    panels.append("accuracy")
  eps = _series(rows, "train", "eps")
  lr = _series(rows, "train", "lr")
  if _varies(eps) or _varies(lr):
    panels.append("schedule")
  diag = _series(rows, "val", "diag_network_ratio_median")
  if diag:
    panels.append("diagnostics")
  known = {"loss", "accuracy", "vra_estimate", "lr"} | set(_NOT_CURVES)
  others = sorted({k for r in rows if str(r.get("split", "train")) == "train" for k in r}
                  - known)
  others = [k for k in others if _varies(_series(rows, "train", k))]
  panels += others
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    if panel == "loss":
      xs, ys = zip(*loss)
      ax.plot(xs, ys, "-", color="tab:blue", label="train loss")
      ax.set_title("training loss", fontsize=9)
    elif panel == "accuracy":
      for (_, name, label, style, color), pts in acc:
        if not pts:
          continue
        xs, ys = zip(*pts)
        extra = ""
        if name == "val_certified_accuracy":
          val = [r for r in rows if r.get("split") == "val"]
          if val and "eps" in val[-1]:
            extra = f" (eps {val[-1]['eps']:g}, {val[-1].get('bound', '?')} bound)"
        ax.plot(xs, ys, style if len(pts) > 1 else style[0], color=color, ms=4,
                label=label + extra)
      for r in tests[-1:]:
        at = r.get("checkpoint_step", r["step"])
        how = f"eps {r['eps']:g}, {r.get('bound', '?')} bound" if "eps" in r else ""
        for key, marker, color in (("test_clean_accuracy", "*", "tab:green"),
                                   ("test_certified_accuracy", "*", "tab:red")):
          if isinstance(r.get(key), (int, float)):
            ax.plot([at], [r[key]], marker, ms=12, color=color, mec="black", mew=0.6,
                    label=f"test {key.split('_')[1]} {r[key]:.3f} (step {at}"
                          f"{', ' + how if key.endswith('certified_accuracy') and how else ''})")
      ax.set_ylim(0, 1)
      ax.set_title("accuracy", fontsize=9)
    elif panel == "diagnostics":
      for name, label, style in (("diag_network_ratio_median", "network, median", "o-"),
                                 ("diag_network_ratio_q10", "network, q10", "s--")):
        pts = _series(rows, "val", name)
        if pts:
          xs, ys = zip(*pts)
          ax.plot(xs, ys, style if len(pts) > 1 else style[0], color="tab:red", ms=4,
                  label=label)
      layers = sorted({int(k[len("diag_layer"):].split("_")[0]) for r in rows for k in r
                       if k.startswith("diag_layer") and k.endswith("_kept_sound")})
      ax2 = ax.twinx()
      for l in layers:
        for name, style in ((f"diag_layer{l}_kept_sound", "-"),
                            (f"diag_layer{l}_kept_train", ":")):
          pts = _series(rows, "val", name)
          if pts:
            xs, ys = zip(*pts)
            ax2.plot(xs, ys, style, color=f"C{l % 10}", alpha=0.6,
                     label=f"layer {l} kept ({'sound' if name.endswith('sound') else 'train'})")
      ax2.set_ylim(0, 1.05)
      ax2.set_ylabel("units kept by the masks", fontsize=8)
      if layers:
        ax2.legend(fontsize=6, loc="lower right", ncol=2)
      ax.set_ylabel("training estimate / sound bound", fontsize=8)
      ax.axhline(1.0, color="gray", lw=0.8)
      ax.set_title("what the loss sees (validation subset, eps_train)", fontsize=9)
    elif panel == "schedule":
      if eps:
        xs, ys = zip(*eps)
        ax.plot(xs, ys, "-", color="tab:purple", label="eps (training)")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("eps", fontsize=8)
      if _varies(lr):
        ax2 = ax.twinx()
        xs, ys = zip(*lr)
        ax2.plot(xs, ys, "--", color="tab:gray", label="learning rate")
        ax2.set_yscale("log")
        ax2.set_ylabel("learning rate", fontsize=8)
        ax2.legend(fontsize=7, loc="lower right")
      ax.set_title("schedules", fontsize=9)
    else:
      xs, ys = zip(*_series(rows, "train", panel))
      ax.plot(xs, ys, "-", label=panel)
      ax.set_title(panel, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
    if panel == "accuracy":   # many entries: below the panel, not over the curves
      ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    elif panel != "loss":
      ax.legend(fontsize=7, loc="upper left")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def write_all(results: Dict, output_dir: str, metrics_path: Optional[str] = None,
              title: Optional[str] = None) -> Dict:
  """Writes every figure that has data; returns ``{name: path}``.

  ``title`` (e.g. data set, model and checkpoint step) heads the figures.
  """
  os.makedirs(output_dir, exist_ok=True)
  out = {"certified_vs_eps": certified_accuracy_vs_eps(
      results, os.path.join(output_dir, "certified_vs_eps.png"), title=title)}
  h = ratio_histogram(results, os.path.join(output_dir, "local_over_global_hist.png"))
  if h:
    out["local_over_global_hist"] = h
  if metrics_path:
    c = training_curves(metrics_path, os.path.join(output_dir, "training_curves.png"),
                        title=title)
    if c:
      out["training_curves"] = c
  return out
