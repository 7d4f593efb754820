"""Certificates and certified radii.

For an example with label ``y`` and a bound ``R(x) = eps * prod_{l<L} s_l(x)``
on how far the penultimate activation can move inside ``B(x, eps)``, the gap
``z_y - z_i`` can shrink by at most

  ``Delta_iy = min(R ||D_{L-1} (w_i - w_y)||_2,  IBP_iy)``

where ``D_{L-1}`` deletes the last layer's constant columns and ``IBP_iy`` is
the exact maximum of ``(w_i - w_y) . (h - h(x))`` over the penultimate box
(both are sound, so their minimum is). The example is *certified* when it is
classified correctly and ``z_y - z_i > Delta_iy`` for every ``i != y``. Any
NaN or inf on the way makes it *not* certified.

With ``bound="global"`` the GloRo certificate with exact global norms is
used instead (no masks, no boxes), the baseline of the paper.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipjax.bounds import graph, lipschitz, network, norms

Array = jax.Array

_REL_TOL = 1e-5
_ABS_TOL = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Certificate:
  """Result of :func:`certify` for ``B`` examples.

  Attributes:
    predicted: ``(B,)`` int32 argmax of the logits.
    certified: ``(B,)`` bool; ``predicted == y`` and no point of ``B(x, eps)``
      changes the prediction (with probability ``>= 1 - failure_probability``
      over the Lanczos start vectors where that is nonzero).
    radius: ``(B,)`` certified radius for the label: ``eps`` where certified,
      0 elsewhere (masks hold only inside ``B(x, eps)``, so no larger radius
      is claimed).
    robust_radius: ``(B,)`` certified radius of the *prediction*:
      ``min(eps, min_i (z_p - z_i) / (||D (w_p - w_i)|| prod s_l))`` with ``p``
      the predicted class (``eps`` where the prediction is certified at
      ``eps``); valid for wrong predictions too.
    margin: ``(B,)`` ``min_{i != y} (z_y - z_i - Delta_iy)``; > 0 iff robust.
    lipschitz: ``(B,)`` the bound on the logits' Lipschitz constant used.
    failure_probability: ``(B,)`` see :class:`~lipjax.bounds.lipschitz.LocalBound`.
    local: ``(B,)`` bool, whether the sound local bound was computed for the
      example. With ``certify(..., triage=True)`` (the default) it is not for
      examples the triage decides: those are reported with the exact global
      certificate (``lipschitz`` the global bound, ``failure_probability``
      0), which is sound and, for an example it certifies, implies the local
      certificate.
  """

  predicted: Array
  certified: Array
  radius: Array
  robust_radius: Array
  margin: Array
  lipschitz: Array
  failure_probability: Array
  local: Array


def check_labels(y, batch: int, num_classes: int) -> Array:
  concrete = not isinstance(y, jax.core.Tracer)
  y = np.asarray(y) if concrete else y
  if y.shape != (batch,):
    raise ValueError(f"y must have shape ({batch},), got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
  if concrete and np.any((y < 0) | (y >= num_classes)):
    raise ValueError(f"labels must be in [0, {num_classes}), got range "
                     f"[{int(y.min())}, {int(y.max())}]")
  return jnp.asarray(y, jnp.int32)


def pair_terms(mat, col, labels):
  """``(B, C, h)`` rows ``w_i - w_label``, column-masked."""
  diff = mat[None, :, :] - mat[labels][:, None, :]
  return diff * col[:, None, :]


def _margins(logits, labels, diff, radius_scale, ibp):
  """Gaps, Lipschitz deltas and the certificate for ``labels``."""
  c = logits.shape[-1]
  pn = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))                    # (B, C)
  delta = radius_scale[:, None] * pn * (1.0 + norms.ROUNDING_SLACK)
  if ibp is not None:
    mid_off, half = ibp
    d_ibp = (jnp.einsum("bch,bh->bc", diff, mid_off)
             + jnp.einsum("bch,bh->bc", jnp.abs(diff), half))
    delta = jnp.minimum(delta, d_ibp)
  gap = jnp.take_along_axis(logits, labels[:, None], axis=1) - logits  # (B, C)
  tol = _REL_TOL * (jnp.abs(gap) + delta) + _ABS_TOL
  other = jnp.arange(c)[None, :] != labels[:, None]
  slack = jnp.where(other, gap - delta - tol, jnp.inf)
  margin = jnp.min(slack, axis=1)
  return gap, pn, margin, other


def certify_arrays(model, variables, x, y, eps, *, bound: str = "local",
                   **options) -> Certificate:
  """Un-batched core of :func:`certify` (jit-compatible; one call, one batch)."""
  model = graph.as_model(model)
  x, eps = lipschitz.check_inputs(model, x, eps)
  b = x.shape[0]
  if bound == "local":
    lb = lipschitz.local_lipschitz_bound(model, variables, x, eps, **options)
    stages = network.trace(model, variables, tuple(x.shape[1:]))
    last, layers = stages[-1], lb.layers
    logits = lb.logits
    col = (last._pre(layers[-2].col_mask).reshape(b, -1)  # pylint: disable=protected-access
           if len(layers) > 1 else jnp.ones((b, int(np.prod(x.shape[1:])))))
    inner = jnp.prod(jnp.stack(lb.layer_norms[:-1]), axis=0) if len(layers) > 1 \
        else jnp.ones((b,))
    lo = last._pre(layers[-1].input_lower).reshape(b, -1)  # pylint: disable=protected-access
    hi = last._pre(layers[-1].input_upper).reshape(b, -1)  # pylint: disable=protected-access
    ctr = last._pre(layers[-1].input_center).reshape(b, -1)  # pylint: disable=protected-access
    ibp = (0.5 * (lo + hi) - ctr, 0.5 * (hi - lo))
    lip, fail = lb.bound, lb.failure_probability
    finite_extra = jnp.all(jnp.isfinite(jnp.stack(lb.layer_norms)), axis=0)
  elif bound == "global":
    if options.get("mode", "sound") != "sound":
      raise ValueError("bound='global' is always sound; do not pass mode")
    options = {k: v for k, v in options.items() if k in ("key", "failure_probability")}
    stages = network.trace(model, variables, tuple(x.shape[1:]))
    last = stages[-1]
    _, gn = lipschitz.global_lipschitz_bound(model, variables, input_shape=x.shape[1:],
                                             per_layer=True, **options)
    logits = model.apply(variables, x)
    inner = jnp.full((b,), jnp.prod(jnp.stack(gn[:-1])) if len(gn) > 1 else 1.0)
    col = jnp.ones((b, int(np.prod(last.layer_in_shape))))
    ibp = None
    lip = jnp.full((b,), jnp.prod(jnp.stack(gn)))
    fail = jnp.zeros((b,), jnp.float32)
    finite_extra = jnp.isfinite(lip)
  else:
    raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")

  num_classes = logits.shape[-1]
  y = check_labels(y, b, num_classes)
  mat = last.layer.explicit_matrix(last.params)
  predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scale = eps * inner

  def for_labels(labels):
    if mat is not None:
      diff = pair_terms(mat, col, labels)
    else:   # generic last layer: ||(e_i - e_y)^T W D|| <= sqrt(2) s_L
      sl = lip / jnp.maximum(inner, 1e-30)
      diff = jnp.zeros((b, num_classes, 1)) + (jnp.sqrt(2.0) * sl)[:, None, None]
    return _margins(logits, labels, diff, scale, ibp if mat is not None else None)

  _, _, margin, _ = for_labels(y)
  finite = (jnp.all(jnp.isfinite(logits), axis=1) & jnp.isfinite(margin)
            & jnp.isfinite(scale) & finite_extra)
  certified = (predicted == y) & (margin > 0) & finite
  radius = jnp.where(certified, eps, 0.0)

  gap_p, pn_p, margin_p, other_p = for_labels(predicted)   # for robust_radius
  denom = pn_p * inner[:, None] * (1.0 + norms.ROUNDING_SLACK)
  ratio = jnp.where(other_p, gap_p / jnp.maximum(denom, 1e-30), jnp.inf)
  ratio = jnp.where(other_p & (denom <= 0), jnp.where(gap_p > 0, jnp.inf, 0.0), ratio)
  rr = jnp.clip(jnp.min(ratio, axis=1) * (1.0 - _REL_TOL), 0.0, eps)
  rr = jnp.where(margin_p > 0, eps, rr)
  rr = jnp.where(finite & jnp.isfinite(rr), rr, 0.0)
  return Certificate(predicted=predicted, certified=certified, radius=radius,
                     robust_radius=rr, margin=jnp.where(finite, margin, -jnp.inf),
                     lipschitz=lip, failure_probability=fail,
                     local=jnp.full((b,), bound == "local"))


@functools.lru_cache(maxsize=32)
def _jitted(model, bound, options_items):
  options = dict(options_items)

  def fn(variables, x, y, eps, key):
    return certify_arrays(model, variables, x, y, eps, bound=bound, key=key, **options)

  return jax.jit(fn)


def certify(model, variables, x, y, eps, *, bound: str = "local",
            batch_size: Optional[int] = 256, key: Optional[Array] = None,
            jit: bool = True, triage: bool = True, triage_steps: int = 8,
            **options) -> Certificate:
  """Certifies ``B`` examples against l2 perturbations of size ``eps``.

  With ``bound="local"`` and ``triage`` (the default) three cheap tests run
  first, and only the examples they leave undecided get the sound local bound:

  1. a wrong prediction is not certified;
  2. an example certified by the exact global bound is certified (the local
     margin is never smaller than the global one);
  3. an example whose margin is not positive even with every per-layer norm
     replaced by an estimate from below (``local_lipschitz_bound`` with
     ``mode="lower"`` and ``triage_steps`` Lanczos steps) is not certified,
     since the sound margin is smaller still.

  The triage never certifies anything the global certificate does not; it
  only saves the Lanczos runs whose outcome is known.

  Args:
    model: a :class:`lipjax.nn.Sequential`, a Flax module or a function
      ``fn(variables, x)`` (see :mod:`lipjax.bounds.graph`).
    variables: its variables.
    x: ``(B, *input_shape)`` inputs.
    y: ``(B,)`` integer labels in ``[0, num_classes)``.
    eps: scalar or ``(B,)`` radii ``>= 0``.
    bound: ``"local"`` (sound local bound, default) or ``"global"`` (GloRo
      with exact global norms).
    batch_size: examples per compiled call (the last chunk is padded); None
      processes everything at once.
    key: PRNG key of the Lanczos start vectors (default ``PRNGKey(0)``); each
      chunk uses its own fold of it.
    jit: compile the per-chunk computation (default True).
    triage: ``bound="local"``: decide what the cheap tests above can decide
      without the sound local bound (see ``Certificate.local``). False runs
      the sound local bound on every example.
    triage_steps: Lanczos steps of the lower estimates in test 3.
    **options: passed to :func:`lipjax.local_lipschitz_bound` (sound mode
      only: ``lanczos_steps``, ``failure_probability``, ``dense``, ...).

  Returns:
    A :class:`Certificate` with ``(B,)`` fields.
  """
  if options.get("mode", "sound") != "sound":
    raise ValueError("certify uses sound bounds only; estimate mode is for training")
  options.pop("mode", None)
  model = graph.as_model(model)
  if triage_steps < 2:
    raise ValueError(f"triage_steps must be >= 2, got {triage_steps}")
  x, eps = lipschitz.check_inputs(model, x, eps)
  n = x.shape[0]
  num_classes = network.trace(model, variables, tuple(x.shape[1:]))[-1].out_shape[0]
  y = check_labels(y, n, num_classes)
  key = jax.random.PRNGKey(0) if key is None else key
  if bound == "local" and triage:
    return _certify_triaged(model, variables, x, y, eps, batch_size, key, jit,
                            int(triage_steps), options)
  return _certify_chunks(model, variables, x, y, eps, bound, batch_size, key, jit, options)


def _certify_chunks(model, variables, x, y, eps, bound, batch_size, key, jit, options,
                    bucket=False):
  n = x.shape[0]
  limit = batch_size
  if batch_size is None or batch_size >= n:
    batch_size = n
    if bucket:   # subsets of any size share a few compiled shapes: 8, 16, 32, ...
      batch_size = max(8, 1 << (n - 1).bit_length())
      batch_size = batch_size if limit is None else min(batch_size, limit)
  fn = (_jitted(model, bound, tuple(sorted(options.items()))) if jit else
        functools.partial(_call_plain, model, bound, options))
  out = []
  for i, start in enumerate(range(0, n, batch_size)):
    stop = min(start + batch_size, n)
    xs, ys, es = x[start:stop], y[start:stop], eps[start:stop]
    pad = batch_size - (stop - start)
    if pad:
      xs = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, 0)])
      ys = jnp.concatenate([ys, jnp.repeat(ys[-1:], pad, 0)])
      es = jnp.concatenate([es, jnp.repeat(es[-1:], pad, 0)])
    res = fn(variables, xs, ys, es, jax.random.fold_in(key, i))
    out.append(jax.tree_util.tree_map(lambda a, m=stop - start: a[:m], res))
  return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *out)


def _certify_triaged(model, variables, x, y, eps, batch_size, key, jit, steps, options):
  glob = _certify_chunks(model, variables, x, y, eps, "global", batch_size,
                         jax.random.fold_in(key, 1), jit, {})
  undecided = np.asarray((glob.predicted == y) & ~glob.certified)
  idx = np.nonzero(undecided)[0]
  if idx.size:
    lower_opts = dict(options, mode="lower", lanczos_steps=steps)
    lower_opts.pop("dense", None)
    low = _certify_chunks(model, variables, x[idx], y[idx], eps[idx], "local", batch_size,
                          jax.random.fold_in(key, 2), jit, lower_opts, bucket=True)
    # A margin that is not positive with the lower estimates cannot be with
    # the sound bound; NaN stays undecided (the sound run then says no).
    hopeless = np.asarray(low.margin <= 0)
    idx = idx[~hopeless]
  if not idx.size:
    return glob
  sound = _certify_chunks(model, variables, x[idx], y[idx], eps[idx], "local", batch_size,
                          jax.random.fold_in(key, 3), jit, options, bucket=True)
  ji = jnp.asarray(idx)
  return jax.tree_util.tree_map(lambda g, s: g.at[ji].set(s.astype(g.dtype)), glob, sound)


def _call_plain(model, bound, options, variables, x, y, eps, key):
  return certify_arrays(model, variables, x, y, eps, bound=bound, key=key, **options)
