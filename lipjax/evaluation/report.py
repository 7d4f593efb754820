"""Markdown and JSON reports of :func:`lipjax.evaluation.evaluate` results.

The main Markdown table has the shape of the paper's Table 1: one row per radius,
and per bound a cell ``clean / PGD / certified`` in percent (one decimal).
The JSON file holds the same numbers unrounded, plus every per-example value.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional


def pct(x: float) -> str:
  """A fraction as a percentage with one decimal, e.g. ``0.5551 -> '55.5'``."""
  return f"{100.0 * x:.1f}"


def _num(x) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.4g}"


def guarantee_lines(results: Dict) -> list:
  """One line per bound stating what its certificates guarantee."""
  lines = []
  for b in results["bounds"]:
    g = results["summary"]["guarantee"][b]
    exact = [r["layer"] for r in g["layers"] if not r["norm"].startswith("probabilistic")]
    prob = [r["layer"] for r in g["layers"] if r["norm"].startswith("probabilistic")]
    p = g["failure_probability_per_example"]
    if g["deterministic"] and p == 0:
      text = (f"**{b} bound**: deterministic; every layer norm is exact or a deterministic "
              f"upper bound ({', '.join(exact)}).")
    else:
      text = (f"**{b} bound**: probabilistic; deterministic norms for "
              f"{', '.join(exact) or 'no layer'}; Lanczos upper bounds for "
              f"{', '.join(prob)}. Each certificate fails with probability at most "
              f"{p:.1e} over the random start vectors (union bound over the "
              f"certificates at the smallest eps: {g['union_bound_all_certificates']:.1e}).")
    lines.append(text)
  return lines


def to_markdown(results: Dict, title: Optional[str] = None) -> str:
  """Renders the results as Markdown (accuracy table, radii, tightness, guarantees)."""
  s = results["summary"]
  eps, bounds = results["eps"], results["bounds"]
  setting = title or "model"
  out = []
  out.append(f"# Evaluation: {setting}\n")
  n_pgd = s["pgd"].get("examples", s["num_examples"])
  on = "" if n_pgd == s["num_examples"] else f" on the first {n_pgd} examples"
  if on and "clean_accuracy" in s["pgd"]:   # PGD accuracy is out of these, not of all
    on += f" (clean accuracy on them {100 * s['pgd']['clean_accuracy']:.1f}%)"
  out.append(f"{s['num_examples']} examples; PGD{on}: {s['pgd']['steps']} steps, "
             f"{s['pgd']['restarts']} restart(s), step {s['pgd']['step']}, "
             f"{s['pgd']['loss']} loss.\n")
  p = s["pgd"]
  if p.get("skip_certified"):
    out.append("PGD attacked only the correctly classified points no bound certified at that "
               "eps (" + ", ".join(f"{n} at {e:g}" for n, e in zip(p["attacked"], eps))
               + "); certified points count as robust.\n")
  if p.get("cross_check_examples"):
    out.append(f"Cross-check: PGD with fresh starts on every certified point among the first "
               f"{p['cross_check_examples']} examples ("
               + ", ".join(f"{n} at {e:g}" for n, e in zip(p["cross_check_attacked"], eps))
               + f"); violations: {s['violations']}.\n")
  out.append("## Clean / PGD / certified accuracy (%)\n")
  header = "| setting | " + " | ".join(f"{b} bound" for b in bounds) + " |"
  out.append(header)
  out.append("|---|" + "---|" * len(bounds))
  for k, e in enumerate(eps):
    cells = []
    for b in bounds:
      cells.append(f"{pct(s['clean_accuracy'])} / {pct(s['pgd']['accuracy'][k])} / "
                   f"{pct(s['certified'][b]['accuracy'][k])}")
    out.append(f"| {setting}, eps = {e:g} | " + " | ".join(cells) + " |")
  out.append("")
  out.append("## Certified accuracy per eps (%)\n")
  out.append("| eps | clean | PGD | " + " | ".join(f"certified ({b})" for b in bounds)
             + " | " + " | ".join(f"median Lipschitz bound ({b}{', where computed' if b == 'local' else ''})"
                          for b in bounds) + " |")
  out.append("|---|---|---|" + "---|" * (2 * len(bounds)))
  for k, e in enumerate(eps):
    row = [f"{e:g}", pct(s["clean_accuracy"]), pct(s["pgd"]["accuracy"][k])]
    row += [pct(s["certified"][b]["accuracy"][k]) for b in bounds]
    row += [_num(s["certified"][b]["lipschitz_median"][k]) for b in bounds]
    out.append("| " + " | ".join(row) + " |")
  out.append("")
  top = max(eps)
  out.append(f"## Certified radii (label-certified; both bounds capped at the largest eps, "
             f"{top:g}; 0 where misclassified)\n")
  out.append("| bound | cap | nonzero | q10 | q25 | median | q75 | q90 | max | mean |")
  out.append("|---|---|---|---|---|---|---|---|---|---|")
  for b in bounds:
    q = s["radius"][b]
    out.append(f"| {b} | {q['cap']:g} | {pct(q['fraction_nonzero'])}% | {_num(q['q10'])} | "
               f"{_num(q['q25'])} | {_num(q['q50'])} | {_num(q['q75'])} | {_num(q['q90'])} | "
               f"{_num(q['q100'])} | {_num(q['mean'])} |")
  out.append("")
  notes = []
  if "global" in bounds:
    notes.append("Both radii are computed the same way: the largest of the evaluated eps "
                 "at which the certificate holds and of the robust radii the certificates at "
                 "each eps prove (margin / bound, at most that eps), cut at the largest eps, "
                 f"{top:g}.")
  if "local" in bounds:
    fractions = s["certified"]["local"].get("local_bound_fraction")
    reached = ""
    if fractions:
      reached = (" Share of the examples that reached the sound local bound, per eps: "
                 + ", ".join(f"{pct(f)}% at {e:g}" for e, f in zip(eps, fractions)) + ".")
    notes.append("The local bound holds only inside "
                 "the balls evaluated, so no radius above the largest eps is claimed. Examples "
                 "that certify's triage decides without the local bound (a wrong prediction, "
                 "certified by the exact global bound, or refuted by the lower estimate) enter "
                 "with the global certificate's radius at that eps, which the local bound "
                 "could only raise." + reached)
  if notes:
    out.append(" ".join(notes) + "\n")
  if "tightness" in s:
    t = s["tightness"]
    out.append(f"## Tightness at eps = {t['eps']:g} ({t['examples']} examples; global bound "
               f"{_num(t['global_bound'])})\n")
    out.append("| ratio | min | q10 | q25 | median | q75 | q90 | max |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, label in (("local_over_global", "local bound / global bound"),
                        ("local_over_empirical", "local bound / empirical lower bound"),
                        ("global_over_empirical", "global bound / empirical lower bound")):
      q = t[name]
      out.append(f"| {label} | {_num(q['q00'])} | {_num(q['q10'])} | {_num(q['q25'])} | "
                 f"{_num(q['q50'])} | {_num(q['q75'])} | {_num(q['q90'])} | "
                 f"{_num(q['q100'])} |")
    out.append("\nEmpirical lower bound: the largest logits-Jacobian spectral norm found by "
               "gradient ascent inside the ball (power iterations); a ratio near 1 means the "
               "bound is nearly tight.\n")
  out.append("## Guarantees\n")
  for line in guarantee_lines(results):
    out.append(f"- {line}")
  out.append("")
  nv = len(results["violations"])
  if nv:
    out.append(f"**SOUNDNESS VIOLATION: {nv} certified point(s) were broken by PGD.**\n")
  else:
    out.append("Cross-check: no certified point was broken by the PGD attacks.\n")
  tm = s["timing_s"]
  out.append(f"Time: {tm['total']:.1f} s in all ({tm['per_1000_examples']:.1f} s per 1000 "
             "examples; " + ", ".join(f"{k} {v:.1f} s" for k, v in tm.items()
                                      if k not in ("total", "per_1000_examples")) + ").\n")
  return "\n".join(out)


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if hasattr(obj, "tolist"):
    return _jsonable(obj.tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write(results: Dict, output_dir: str, *, title: Optional[str] = None,
          extra: Optional[Dict] = None) -> Dict[str, str]:
  """Writes ``report.md`` and ``report.json`` to ``output_dir``; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  md_path = os.path.join(output_dir, "report.md")
  json_path = os.path.join(output_dir, "report.json")
  with open(md_path, "w") as f:
    f.write(to_markdown(results, title))
  payload = dict(results)
  if extra:
    payload["run"] = extra
  with open(json_path, "w") as f:
    json.dump(_jsonable(payload), f, indent=1)
  return {"markdown": md_path, "json": json_path}
