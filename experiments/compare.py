r"""Compares evaluated runs: one table and one certified-accuracy plot.

Run (after ``experiments.certify`` on each workdir)::

  python -m experiments.compare --runs=local=runs/m4cpu_local,global=runs/m4cpu_global \
      --output=runs/m4cpu_compare.png

Reads ``WORKDIR/eval/report.json`` of every run (``--eval_dir`` names another
folder inside the workdirs), prints a markdown table (clean, PGD and certified
accuracy with both bounds at every eps the runs share, the local / global
tightness ratio and the evaluation's wall time), and for labels ``ARM/RUN``
(``local/s1,local/s2,global/s1,...``) a second table with each arm's mean and
range over its runs, and writes a PNG of certified
accuracy against eps, one colour per run, solid for the local bound and dashed
for the global one. Bad input (a missing or corrupt report, runs without a
common eps) ends with exit code 1 and one line on stderr.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from absl import app, flags

from experiments import cli
from experiments.cli import InputError
from lipjax.evaluation import report

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "LABEL=WORKDIR pairs, comma-separated")
flags.DEFINE_string("eval_dir", "eval", "folder of report.json inside each workdir")
flags.DEFINE_string("output", None, "PNG to write (default: no plot)")
flags.DEFINE_string("title", None, "plot title")


def parse_runs(items) -> List[Tuple[str, str]]:
  """``["label=path", ...]`` -> ``[(label, path), ...]`` (labels unique)."""
  if not items:
    raise InputError("--runs is required: LABEL=WORKDIR pairs, e.g. local=runs/a,global=runs/b")
  out = []
  for item in items:
    label, sep, path = item.partition("=")
    if not sep or not label.strip() or not path.strip():
      raise InputError(f"--runs entry {item!r} is not LABEL=WORKDIR")
    out.append((label.strip(), path.strip()))
  labels = [l for l, _ in out]
  if len(set(labels)) != len(labels):
    raise InputError(f"--runs labels must be unique, got {','.join(labels)}")
  return out


def load_report(workdir: str, eval_dir: str = "eval") -> Dict:
  """The ``report.json`` of an evaluated run (raises InputError in one line)."""
  path = os.path.join(workdir, eval_dir, "report.json")
  if not os.path.isfile(path):
    raise InputError(f"{path} not found: run `python -m experiments.certify "
                     f"--workdir={workdir}` first")
  try:
    with open(path) as f:
      results = json.load(f)
    results["summary"], results["eps"]   # pylint: disable=pointless-statement
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{path} is not a report of experiments.certify ({cli.one_line(e)})") \
        from None
  return results


def _pct(x) -> str:
  return "n/a" if x is None else report.pct(float(x))


def _common_eps(runs: List[Tuple[str, Dict]]) -> List[float]:
  """The eps every run evaluated, sorted (raises InputError when there is none)."""
  common = sorted(set.intersection(*(set(float(e) for e in r["eps"]) for _, r in runs)))
  if not common:
    raise InputError("the runs share no evaluated eps")
  return common


def table(runs: List[Tuple[str, Dict]]) -> str:
  """Markdown table over the eps shared by every run."""
  common = _common_eps(runs)
  head = ("| run | eps | clean | PGD | certified (local bound) | certified (global bound) "
          "| local / global (median) | evaluation wall time |")
  lines = [head, "|" + "---|" * 8]
  for label, r in runs:
    s = r["summary"]
    eps = [float(e) for e in r["eps"]]
    n_pgd = s["pgd"].get("examples", s["num_examples"])
    pgd_note = "" if n_pgd == s["num_examples"] else f" (first {n_pgd})"
    ratio = s.get("tightness", {}).get("local_over_global", {}).get("q50")
    wall = r.get("run", {}).get("wall_s")
    for e in common:
      k = eps.index(e)
      cert = {b: s["certified"].get(b, {}).get("accuracy", [None] * len(eps))[k]
              for b in ("local", "global")}
      lines.append(f"| {label} | {e:g} | {_pct(s['clean_accuracy'])} | "
                   f"{_pct(s['pgd']['accuracy'][k])}{pgd_note} | {_pct(cert['local'])} | "
                   f"{_pct(cert['global'])} | "
                   f"{'n/a' if ratio is None else f'{ratio:.3f}'} | "
                   f"{'n/a' if wall is None else f'{wall / 60:.1f} min'} |")
  return "\n".join(lines)


def _arm(label: str) -> str:
  """The arm of a run label: the part before ``/`` (``local/s1`` -> ``local``)."""
  return label.split("/", 1)[0]


def _spread(values) -> str:
  values = [100 * float(v) for v in values if v is not None]
  if not values:
    return "n/a"
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.2f}"
  return f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def arms_table(runs: List[Tuple[str, Dict]]) -> str:
  """Markdown table of each arm's mean (min-max) over its runs, per shared eps.

  Runs are grouped by the part of their label before ``/`` (``local/s1``,
  ``local/s2`` -> arm ``local``); every run of an arm counts.
  """
  common = _common_eps(runs)
  arms: Dict[str, List[Dict]] = {}
  for label, r in runs:
    arms.setdefault(_arm(label), []).append(r)
  lines = ["| arm | runs | eps | clean | certified (local bound) | certified (global bound) |",
           "|" + "---|" * 6]
  for arm, reports in arms.items():
    for e in common:
      cert = {b: [] for b in ("local", "global")}
      for r in reports:
        k = [float(x) for x in r["eps"]].index(e)
        for b in cert:
          acc = r["summary"]["certified"].get(b, {}).get("accuracy")
          cert[b].append(None if acc is None else acc[k])
      clean = [r["summary"]["clean_accuracy"] for r in reports]
      lines.append(f"| {arm} | {len(reports)} | {e:g} | {_spread(clean)} | "
                   f"{_spread(cert['local'])} | {_spread(cert['global'])} |")
  return "\n".join(lines)


def plot(runs: List[Tuple[str, Dict]], path: str, title: str = None) -> str:
  """Certified accuracy against eps, one colour per run (local solid, global dashed)."""
  import matplotlib   # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4.2))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  top = 0.0
  for i, (label, r) in enumerate(runs):
    s, eps = r["summary"], [float(e) for e in r["eps"]]
    top = max(top, max(eps))
    c = colours[i % len(colours)]
    for b, style in (("local", "o-"), ("global", "s--")):
      if b in s["certified"]:
        ax.plot([0.0] + eps, [100 * s["clean_accuracy"]] +
                [100 * a for a in s["certified"][b]["accuracy"]], style, color=c, ms=5,
                label=f"{label}: certified, {b} bound")
  ax.set_xlabel("eps (l2 radius)")
  ax.set_ylabel("accuracy (%) (eps = 0: clean)")
  ax.set_xlim(0, top * 1.03)
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  n = runs[0][1]["summary"]["num_examples"]
  ax.set_title(f"{title + ': ' if title else ''}{n} test examples", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def run(f) -> int:
  """Runs the comparison for parsed flags ``f``; returns the exit code."""
  pairs = parse_runs(f.runs)
  runs = [(label, load_report(path, f.eval_dir)) for label, path in pairs]
  print(table(runs))
  if len({_arm(label) for label, _ in runs}) < len(runs):   # several runs of an arm
    print("\nmean (min-max) over the runs of each arm:\n")
    print(arms_table(runs))
  if f.output:
    print("wrote " + plot(runs, f.output, f.title))
  return 0


def main(argv):
  del argv
  return run(FLAGS)


if __name__ == "__main__":
  app.run(cli.main_wrapper("compare", main), flags_parser=cli.flags_parser("compare"))
