"""What the training loss sees, against the sound bound: an evaluator.

:func:`bound_diagnostics` runs, on one batch at one radius, the training
estimate exactly as the training step computes it
(:func:`lipjax.training.losses.worst_case_deltas` with the run's bound,
estimator and running power vectors) and the sound local bound
(:func:`lipjax.local_lipschitz_bound`, default options), and compares them
layer by layer and for the whole network:

* ``ratio``: training estimate / sound local bound, per example (median and
  10% quantile). For the network, the product over every layer below the
  last (the factor the loss multiplies the last layer's pair norms with);
  below 1 means the loss trains against an optimistic bound;
* ``kept_train`` / ``kept_sound``: share of the units each mask keeps (the
  units that vary over the ball, per example, averaged);
* ``dead``: share of a layer's units constant on the balls of *every*
  example of the batch (they never receive a bound gradient);
* ``theta_zero`` / ``theta_median``: for clipped activations, the share of
  thresholds at (or below) zero and their median.

The result is a flat dict of floats (``metrics.jsonl``-ready; keys
``network_ratio_median``, ``layer{l}_ratio_q10`` ...).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

import lipjax
from lipjax._src import frontends
from lipjax._src import trace as trace_lib

Array = jax.Array

__all__ = ["bound_diagnostics", "format_diagnostics"]


def _quantiles(a) -> Dict[str, float]:
  a = np.asarray(a, np.float64)
  a = a[np.isfinite(a)]
  if a.size == 0:
    return {"median": float("nan"), "q10": float("nan")}
  return {"median": float(np.median(a)), "q10": float(np.quantile(a, 0.1))}


def _thresholds(params) -> Optional[np.ndarray]:
  """The clip thresholds of an activation (widths of its linear range), or None:
  a learnable ``theta`` (clipped ReLU), or finite ``lower`` and ``upper``
  (clamps)."""
  if not isinstance(params, dict):
    return None
  if "theta" in params:
    return np.asarray(params["theta"], np.float64).ravel()
  if "lower" in params and "upper" in params:
    lo = np.asarray(params["lower"], np.float64)
    hi = np.asarray(params["upper"], np.float64)
    lo, hi = np.broadcast_arrays(lo, hi)
    finite = np.isfinite(lo) & np.isfinite(hi)
    if not np.any(finite):
      return None
    return (hi - lo)[finite].ravel()
  return None


def bound_diagnostics(model, variables, x, y, eps, *, bound: str = "local",
                      iterations: int = 5, power=None, estimator: Optional[dict] = None,
                      key: Optional[Array] = None) -> Dict[str, float]:
  """Compares the training estimate with the sound local bound on one batch.

  Args:
    model: a model lipjax's bounds accept (with a dense last layer).
    variables: its variables ``{"params": ...}``.
    x: ``(B, *input_shape)`` inputs (a fixed validation subset).
    y: ``(B,)`` integer labels.
    eps: scalar radius (the training eps).
    bound: the run's training bound, ``"local"`` or ``"global"``.
    iterations: the run's per-step power iterations.
    power: the run's running power vectors (``TrainState.power``); None:
      fresh ones from :func:`lipjax.training.losses.init_power_state`.
    estimator: extra keyword options of ``worst_case_deltas`` (the run's
      training estimator options).
    key: PRNG key of the sound bound's Lanczos starts.

  Returns:
    A flat dict of floats: ``network_ratio_median``, ``network_ratio_q10``,
    and per hidden layer ``l``: ``layer{l}_ratio_median``, ``layer{l}_ratio_q10``,
    ``layer{l}_kept_train``, ``layer{l}_kept_sound``, ``layer{l}_dead``, and
    for clipped activations ``layer{l}_theta_zero``, ``layer{l}_theta_median``;
    ``seconds``.
  """
  from lipjax.training import losses   # pylint: disable=import-outside-toplevel
  t0 = time.time()
  model, variables = frontends.resolve(model, variables)
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  eps = float(eps)
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]))
  hidden = stages[:-1]
  _, _, aux = losses.worst_case_deltas(model, variables, x, y, eps, bound=bound,
                                       iterations=iterations, power=power,
                                       **dict(estimator or {}))
  train_norms = aux["layer_norms"]
  train_cols = aux["col_masks"]
  sound = lipjax.local_lipschitz_bound(model, variables, x, eps, key=key)
  b = x.shape[0]
  out: Dict[str, float] = {}
  est_inner = stages.product([jnp.broadcast_to(n, (b,)) for n in train_norms[:-1]],
                             logits=False)
  snd_inner = stages.product(list(sound.layer_norms[:-1]), logits=False)
  for k, v in _quantiles(np.asarray(est_inner) / np.asarray(snd_inner)).items():
    out[f"network_ratio_{k}"] = v
  for l, st in enumerate(hidden):
    ratio = np.asarray(jnp.broadcast_to(train_norms[l], (b,))) / np.asarray(
        sound.layer_norms[l])
    for k, v in _quantiles(ratio).items():
      out[f"layer{l}_ratio_{k}"] = v
    col_sound = np.asarray(sound.layers[l].col_mask).reshape(b, -1)
    out[f"layer{l}_kept_sound"] = float(np.mean(col_sound))
    if train_cols[l] is not None:
      out[f"layer{l}_kept_train"] = float(np.mean(np.asarray(train_cols[l])))
    out[f"layer{l}_dead"] = float(np.mean(np.max(col_sound, axis=0) == 0))
    th = _thresholds(st.act_params)
    if th is not None and th.size:
      out[f"layer{l}_theta_zero"] = float(np.mean(th <= 0))
      out[f"layer{l}_theta_median"] = float(np.median(th))
  out["seconds"] = time.time() - t0
  return out


def format_diagnostics(diag: Dict[str, Any], eps: Optional[float] = None) -> str:
  """A Markdown table of :func:`bound_diagnostics`' result (one row per layer)."""
  layers = sorted({int(k[5:].split("_")[0]) for k in diag if k.startswith("layer")})
  head = "training estimate against the sound local bound"
  if eps is not None:
    head += f" at eps {eps:g}"
  lines = [head + ":", "",
           "| layer | ratio median | ratio q10 | kept (train masks) | kept (sound masks) "
           "| dead | theta <= 0 | theta median |",
           "|---|---|---|---|---|---|---|---|"]

  def f(key, fmt="{:.4f}"):
    v = diag.get(key)
    return "-" if v is None else fmt.format(v)

  for l in layers:
    lines.append(f"| {l} | {f(f'layer{l}_ratio_median')} | {f(f'layer{l}_ratio_q10')} | "
                 f"{f(f'layer{l}_kept_train', '{:.3f}')} | "
                 f"{f(f'layer{l}_kept_sound', '{:.3f}')} | {f(f'layer{l}_dead', '{:.3f}')} | "
                 f"{f(f'layer{l}_theta_zero', '{:.3f}')} | "
                 f"{f(f'layer{l}_theta_median', '{:.3g}')} |")
  lines.append(f"| network | {f('network_ratio_median')} | {f('network_ratio_q10')} | "
               "| | | | |")
  return "\n".join(lines)
