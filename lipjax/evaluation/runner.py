"""Evaluation of a trained network: clean, PGD and certified accuracy, radii, tightness.

:func:`evaluate` runs everything batch by batch (so a 10,000-image test set
needs only one batch of device memory at a time) and returns a plain dict of
numbers (summary and per-example arrays) that :mod:`lipjax.evaluation.report`
turns into Markdown and JSON and :mod:`lipjax.evaluation.plots` into figures.

Several radii in one run:

* global bound: one certificate call per ``eps`` over the whole split
  (cheap: a forward pass and the parameter-only norms), so that each column
  is exactly what ``lipjax.certify(..., eps, bound="global")`` certifies;
* local bound: the masks hold only inside ``B(x, eps)``, so every ``eps`` needs
  its own bound computation.

A point certified at ``eps`` is certified at every smaller radius (the balls
are nested); ``certified`` applies that, ``certified_direct`` keeps each
radius's own certificate.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import frontends
from lipjax._src.certify import certify as certify_fn
from lipjax._src import lipschitz
from lipjax._src import trace as trace_lib
from lipjax.evaluation import pgd, tightness

BOUNDS = ("local", "global")

@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """Options of :func:`evaluate`.

  Attributes:
    bounds: subset of ``("local", "global")``.
    pgd_steps, pgd_restarts, pgd_step_scale, pgd_step_size, pgd_loss: PGD
      settings (step ``pgd_step_scale * eps`` unless ``pgd_step_size`` is set).
    batch_size: examples per compiled call.
    tightness_examples: how many of the first examples get the tightness
      report (0 disables it).
    tightness_eps: radius of the tightness report (default: the largest eps).
    tightness_steps, tightness_iterations: gradient-ascent steps and power
      iterations of the Jacobian-norm search.
    pgd_examples: attack only the first ``pgd_examples`` examples (0: all);
      the PGD accuracy is then over those examples. Clean and certified
      accuracy always cover every example. A point the model misclassifies
      is never attacked (it is not robust whatever the attack finds), and
      each restart attacks only the points no earlier restart broke.
    pgd_skip_certified: do not attack points certified at that eps by one of
      the bounds; they count as robust, which they are if the certificate
      holds, so the PGD accuracy is unchanged. With ``cross_check`` (which
      attacks them anyway, with fresh starts) the reported accuracy does
      not rely on the certificates.
    cross_check: attack every certified point (among the first
      ``cross_check_examples``) again with fresh random starts.
    cross_check_examples: how many of the first examples the cross-check
      covers (0: the same examples as PGD).
    certify_options: extra keyword arguments of :func:`lipjax.certify`.
    seed: PRNG seed of the attacks and the Lanczos start vectors.
    progress: show tqdm progress bars.
  """

  bounds: Sequence[str] = BOUNDS
  pgd_steps: int = 100
  pgd_restarts: int = 1
  pgd_step_scale: float = 0.25
  pgd_step_size: Optional[float] = None
  pgd_loss: str = "margin"
  pgd_examples: int = 0
  pgd_skip_certified: bool = False
  batch_size: int = 256
  tightness_examples: int = 1000
  tightness_eps: Optional[float] = None
  tightness_steps: int = 10
  tightness_iterations: int = 5
  cross_check: bool = False
  cross_check_examples: int = 0
  certify_options: Optional[dict] = None
  seed: int = 0
  progress: bool = True


def check_eps_list(eps_list) -> List[float]:
  """Validates a list of radii: non-empty, finite, > 0; returns it sorted."""
  eps = [float(e) for e in eps_list]
  if not eps:
    raise ValueError("the eps list is empty")
  bad = [e for e in eps if not np.isfinite(e) or e <= 0]
  if bad:
    raise ValueError(f"every eps must be finite and > 0, got {bad[0]}")
  return sorted(set(eps))


def _progress(iterable, enabled, **kwargs):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm   # pylint: disable=import-outside-toplevel
  return tqdm(iterable, **kwargs)


@functools.lru_cache(maxsize=8)
def _apply_jit(model):
  return jax.jit(model.apply)


def _example_keys(base_key, ids, restart):
  """``(B, 2)`` raw PRNG keys: example ``ids[i]``'s key for restart ``restart``."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base_key, i), restart))(
      jnp.asarray(ids, jnp.uint32))


def _nanmedian(a) -> float:
  """Median over the finite entries (NaN: not computed); NaN if there are none."""
  a = np.asarray(a, np.float64)
  a = a[~np.isnan(a)]
  return float(np.median(a)) if a.size else float("nan")


def _pad(a: np.ndarray, size: int) -> np.ndarray:
  if a.shape[0] == size:
    return a
  reps = np.repeat(a[-1:], size - a.shape[0], axis=0)
  return np.concatenate([a, reps], axis=0)


_RULE_TEXT = {
    "exact": "exact (SVD or float64 eigensolver of the explicit matrix)",
    "deterministic": "deterministic upper bound (the layer's own global norm, e.g. circulant FFT)",
    "probabilistic": "probabilistic (Lanczos upper bound)",
}


def describe_guarantee(model, variables, input_shape, bound: str) -> Dict[str, object]:
  """:func:`lipjax.bound_guarantee` as a JSON-ready dict for the reports.

  Returns:
    ``{"layers": [{"layer", "rule", "norm"}...], "deterministic": bool,
    "operand_roundoff": float}``, ``norm`` a readable form of ``rule``.
  """
  g = lipschitz.bound_guarantee(model, variables, bound=bound,
                                input_shape=tuple(input_shape))
  rows = [{"layer": name, "rule": rule, "norm": _RULE_TEXT[rule]} for name, rule in g.layers]
  return {"layers": rows, "deterministic": g.deterministic,
          "operand_roundoff": g.operand_roundoff}


def evaluate(model, variables, images, labels, eps_list, options: EvalOptions = EvalOptions(),
             ) -> Dict[str, object]:
  """Clean / PGD / certified accuracy at every ``eps``, radii and tightness.

  Args:
    model: a :class:`lipjax.nn.Sequential`, a Flax module or a function
      ``fn(variables, x)`` (see :func:`lipjax.local_lipschitz_bound`).
    variables: its variables ``{"params": ...}``.
    images: ``(N, *input_shape)`` float32 in ``[0, 1]`` (host numpy is fine).
    labels: ``(N,)`` integer labels.
    eps_list: radii ``> 0``.
    options: :class:`EvalOptions`.

  Returns:
    A dict with ``"eps"``, ``"summary"`` (accuracies per bound and eps,
    radius and tightness quantiles, guarantees, timing), ``"per_example"``
    (lists of length N) and ``"violations"`` (cross-check failures; empty
    when every certified point survived the attacks).
  """
  eps_list = check_eps_list(eps_list)
  model, variables = frontends.resolve(model, variables)
  bounds = tuple(options.bounds)
  if not bounds or any(b not in BOUNDS for b in bounds):
    raise ValueError(f"bounds must be a non-empty subset of {BOUNDS}, got {bounds}")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  n = images.shape[0]
  if n == 0:
    raise ValueError("no examples to evaluate")
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
  input_shape = tuple(images.shape[1:])
  stages = trace_lib.trace(model, variables, input_shape)
  num_classes = stages[-1].out_shape[0]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must be in [0, {num_classes})")
  bs = max(1, min(int(options.batch_size), n))
  cert_opts = dict(options.certify_options or {})
  key = jax.random.PRNGKey(options.seed)
  apply = _apply_jit(model)
  k_eps = len(eps_list)
  timing = {"clean": 0.0, "pgd": 0.0, "local": 0.0, "global": 0.0, "tightness": 0.0,
            "cross_check": 0.0}

  predicted = np.zeros(n, np.int32)
  pgd_success = np.zeros((k_eps, n), bool)
  pgd_norm = np.zeros((k_eps, n), np.float64)
  cert = {b: np.zeros((k_eps, n), bool) for b in bounds}
  rr = {b: np.zeros((k_eps, n), np.float32) for b in bounds}
  lip = {b: np.zeros((k_eps, n), np.float32) for b in bounds}
  fail = {b: np.zeros((k_eps, n), np.float32) for b in bounds}
  local_computed = np.zeros((k_eps, n), bool)   # the local bound ran (not triaged)

  n_pgd = n if int(options.pgd_examples) <= 0 else min(int(options.pgd_examples), n)
  num_batches = -(-n // bs)
  for bi in _progress(range(num_batches), options.progress, desc="certify", unit="batch"):
    lo, hi = bi * bs, min((bi + 1) * bs, n)
    m = hi - lo
    xb = jnp.asarray(_pad(images[lo:hi], bs))
    t0 = time.perf_counter()
    pred = np.asarray(jnp.argmax(apply(variables, xb), axis=-1))[:m]
    predicted[lo:hi] = pred
    timing["clean"] += time.perf_counter() - t0

  if "global" in bounds:
    # Each eps's own certificate (what lipjax.certify answers at that eps).
    t0 = time.perf_counter()
    xs_all, ys_all = jnp.asarray(images), jnp.asarray(labels)
    for k, e in enumerate(eps_list):
      c = certify_fn(model, variables, xs_all, ys_all, e, bound="global", batch_size=bs,
                     key=jax.random.fold_in(key, 20 + k))
      ok = np.asarray(c.predicted) == labels
      cert["global"][k] = np.asarray(c.certified)
      rr["global"][k] = np.where(ok, np.asarray(c.robust_radius), 0.0)
      lip["global"][k] = np.asarray(c.lipschitz)
      fail["global"][k] = np.asarray(c.failure_probability)
    timing["global"] += time.perf_counter() - t0

  if "local" in bounds:
    # One call per radius over the whole split: certify's triage then sends
    # the undecided points of all batches to the sound bound together.
    t0 = time.perf_counter()
    xs_all, ys_all = jnp.asarray(images), jnp.asarray(labels)
    for k, e in enumerate(_progress(eps_list, options.progress, desc="local certificates",
                                    unit="eps")):
      c = certify_fn(model, variables, xs_all, ys_all, e, bound="local", batch_size=bs,
                     key=jax.random.fold_in(key, 10 + k), **cert_opts)
      ok = np.asarray(c.predicted) == labels
      cert["local"][k] = np.asarray(c.certified)
      rr["local"][k] = np.where(ok, np.asarray(c.robust_radius), 0.0)
      # NaN where the triage decided without the local bound (Certificate.local).
      lip["local"][k] = np.where(np.asarray(c.local), np.asarray(c.lipschitz), np.nan)
      fail["local"][k] = np.asarray(c.failure_probability)
      local_computed[k] = np.asarray(c.local)
    timing["local"] += time.perf_counter() - t0

  correct = predicted == labels

  # Nested balls: certified at a larger eps implies certified at a smaller one.
  cert_nested = {}
  for b in bounds:
    c = cert[b].copy()
    for k in range(k_eps - 2, -1, -1):
      c[k] |= c[k + 1]
    cert_nested[b] = c

  # Certified radius per example (for the label; 0 where misclassified), for
  # both bounds alike: the largest of the certified eps and of the robust
  # radii of the certificates at each eps (never above the largest eps: the
  # local masks hold only inside the balls evaluated).
  top = max(eps_list)
  eps_col = np.asarray(eps_list, np.float32)[:, None]
  radius = {b: np.max(np.where(cert_nested[b], eps_col, rr[b]), axis=0) for b in bounds}

  def attack(indices, e, base_key, desc):
    """PGD on ``images[indices]`` at radius ``e``, restart by restart, each
    restart only on the points no earlier one broke; every example's random
    starts come from its own key, so results do not depend on the batching."""
    success = np.zeros(len(indices), bool)
    norm = np.zeros(len(indices), np.float64)
    alive = np.arange(len(indices))
    for r in range(int(options.pgd_restarts)):
      for start in _progress(range(0, len(alive), bs), options.progress,
                             desc=f"{desc} eps={e:g} restart {r + 1}", unit="batch"):
        sel = alive[start:start + bs]
        ids = np.asarray(indices)[sel]
        xb = jnp.asarray(_pad(images[ids], bs))
        yb = jnp.asarray(_pad(labels[ids], bs))
        res = pgd.pgd_attack(model.apply, variables, xb, yb, e, steps=options.pgd_steps,
                             restarts=1, step_size=options.pgd_step_size,
                             step_scale=options.pgd_step_scale, loss=options.pgd_loss,
                             example_keys=_example_keys(base_key, _pad(ids, bs), r))
        hit = np.asarray(res.success)[:len(sel)]
        success[sel] |= hit
        norm[sel] = np.where(hit, pgd.perturbation_norm(xb, res.x_adv)[:len(sel)], norm[sel])
      alive = alive[~success[alive]]
      if not len(alive):
        break
    return success, norm

  # PGD on the correctly classified points among the first n_pgd.
  t0 = time.perf_counter()
  pgd_attacked = np.zeros(k_eps, np.int64)
  for k, e in enumerate(eps_list):
    target = correct.copy()
    target[n_pgd:] = False
    if options.pgd_skip_certified:
      for b in bounds:
        target &= ~cert_nested[b][k]
    idx = np.nonzero(target)[0]
    pgd_attacked[k] = len(idx)
    if len(idx):
      succ, nrm = attack(idx, e, jax.random.fold_in(key, 1000 + k), "PGD")
      pgd_success[k, idx] = succ
      pgd_norm[k, idx] = nrm
  pgd_success[:, :n_pgd] |= ~correct[None, :n_pgd]
  timing["pgd"] = time.perf_counter() - t0
  pgd_robust = (correct[None, :] & ~pgd_success)[:, :n_pgd]

  violations = []
  for b in bounds:
    for k, e in enumerate(eps_list):
      for i in np.nonzero(cert_nested[b][k] & pgd_success[k])[0]:
        if pgd_norm[k, i] <= e:
          violations.append({"index": int(i), "eps": e, "bound": b, "attack": "pgd",
                             "perturbation_norm": float(pgd_norm[k, i])})

  n_cc = n_pgd if int(options.cross_check_examples) <= 0 else min(
      int(options.cross_check_examples), n)
  cc_attacked = np.zeros(k_eps, np.int64)
  if options.cross_check:
    t0 = time.perf_counter()
    for k, e in enumerate(eps_list):
      idx = np.nonzero(np.any([cert_nested[b][k][:n_cc] for b in bounds], axis=0))[0]
      cc_attacked[k] = len(idx)
      if not len(idx):
        continue
      succ, nrm = attack(idx, e, jax.random.fold_in(key, 7_000_000 + k), "cross-check")
      for j in np.nonzero(succ & (nrm <= e))[0]:
        for b in bounds:
          if cert_nested[b][k, idx[j]]:
            violations.append({"index": int(idx[j]), "eps": e, "bound": b,
                               "attack": "cross_check", "perturbation_norm": float(nrm[j])})
    timing["cross_check"] = time.perf_counter() - t0

  # Tightness at one radius on the first examples.
  tight = None
  nt = min(int(options.tightness_examples), n)
  if nt > 0:
    t0 = time.perf_counter()
    te = float(options.tightness_eps or max(eps_list))
    local_b, emp = [], []
    gbound = float(lipschitz.global_lipschitz_bound(model, variables,
                                                    input_shape=input_shape))
    # The certificates already hold the local bound at every eps of the list.
    reuse = "local" in bounds and te in eps_list
    for start in _progress(range(0, nt, bs), options.progress, desc="tightness",
                           unit="batch"):
      stop = min(start + bs, nt)
      xb = jnp.asarray(_pad(images[start:stop], bs))
      tk = jax.random.fold_in(key, 9_000_000 + start)
      known = lip["local"][eps_list.index(te), start:stop] if reuse else None
      if known is not None and not np.any(np.isnan(known)):
        local_b.append(known)
      else:
        lb = lipschitz.local_lipschitz_bound(model, variables, xb, te, key=tk, **cert_opts)
        local_b.append(np.asarray(lb.bound)[:stop - start])
      js = tightness.jacobian_norm_lower_bound(
          model, variables, xb, te, steps=options.tightness_steps,
          iterations=options.tightness_iterations, key=jax.random.fold_in(tk, 1))
      emp.append(np.asarray(js.lower_bound)[:stop - start])
    local_b = np.concatenate(local_b).astype(np.float64)
    emp = np.concatenate(emp).astype(np.float64)
    tight = {
        "eps": te, "examples": nt, "global_bound": gbound,
        "local_bound": local_b, "empirical_lower_bound": emp,
        "local_over_global": local_b / gbound,
        "local_over_empirical": local_b / np.maximum(emp, 1e-30),
        "global_over_empirical": gbound / np.maximum(emp, 1e-30),
    }
    timing["tightness"] = time.perf_counter() - t0

  # ---- summary ----
  acc = lambda a: float(np.mean(a))
  summary = {
      "num_examples": int(n),
      "clean_accuracy": acc(correct),
      "pgd": {"steps": options.pgd_steps, "restarts": options.pgd_restarts,
              "step": (f"{options.pgd_step_size:g}" if options.pgd_step_size
                       else f"{options.pgd_step_scale:g} * eps"),
              "loss": options.pgd_loss, "examples": n_pgd,
              "clean_accuracy": acc(correct[:n_pgd]) if n_pgd else 0.0,
              "skip_certified": bool(options.pgd_skip_certified),
              "attacked": [int(a) for a in pgd_attacked],
              "cross_check_examples": n_cc if options.cross_check else 0,
              "cross_check_attacked": [int(a) for a in cc_attacked],
              "accuracy": [acc(pgd_robust[k]) for k in range(k_eps)]},
      "certified": {}, "radius": {}, "guarantee": {}, "timing_s": timing,
  }
  for b in bounds:
    fmax = float(np.max(fail[b])) if n else 0.0
    ncert = int(np.sum(cert_nested[b][0]))
    summary["certified"][b] = {
        "accuracy": [acc(cert_nested[b][k]) for k in range(k_eps)],
        "accuracy_direct": [acc(cert[b][k]) for k in range(k_eps)],
        "lipschitz_median": [_nanmedian(lip[b][k]) for k in range(k_eps)],
    }
    if b == "local":
      # Share of the examples that reached the sound local bound at each eps;
      # the others were decided by certify's triage with the exact global
      # certificate (wrong prediction, certified globally, or refuted by
      # the lower estimate).
      summary["certified"][b]["local_bound_fraction"] = [acc(local_computed[k])
                                                         for k in range(k_eps)]
    radius_q = tightness.quantiles(radius[b])
    radius_q["fraction_nonzero"] = float(np.mean(radius[b] > 0))
    radius_q["cap"] = top
    summary["radius"][b] = radius_q
    g = describe_guarantee(model, variables, input_shape, b)
    g["failure_probability_per_example"] = fmax
    g["union_bound_all_certificates"] = min(1.0, fmax * ncert)
    summary["guarantee"][b] = g
  summary["violations"] = len(violations)
  if tight is not None:
    summary["tightness"] = {
        "eps": tight["eps"], "examples": tight["examples"],
        "global_bound": tight["global_bound"],
        "local_over_global": tightness.quantiles(tight["local_over_global"]),
        "local_over_empirical": tightness.quantiles(tight["local_over_empirical"]),
        "global_over_empirical": tightness.quantiles(tight["global_over_empirical"]),
    }
  total = sum(timing.values())
  timing["total"] = total
  timing["per_1000_examples"] = 1000.0 * total / n

  per_example = {
      "label": labels.tolist(), "predicted": predicted.tolist(),
      "pgd_success": {f"{e:g}": pgd_success[k].tolist() for k, e in enumerate(eps_list)},
  }
  for b in bounds:
    per_example[f"certified_{b}"] = {f"{e:g}": cert_nested[b][k].tolist()
                                     for k, e in enumerate(eps_list)}
    per_example[f"lipschitz_{b}"] = {f"{e:g}": lip[b][k].astype(float).tolist()
                                     for k, e in enumerate(eps_list)}
    per_example[f"radius_{b}"] = radius[b].astype(float).tolist()
  if "local" in bounds:
    per_example["local_bound_computed"] = {f"{e:g}": local_computed[k].tolist()
                                           for k, e in enumerate(eps_list)}
  if tight is not None:
    for name in ("local_bound", "empirical_lower_bound", "local_over_global",
                 "local_over_empirical"):
      per_example[f"tightness_{name}"] = tight[name].tolist()
  return {"eps": eps_list, "bounds": list(bounds), "summary": summary,
          "per_example": per_example, "violations": violations}
