"""Certificates and certified radii.

For an example with label ``y`` and a bound ``R(x) = eps * prod_{l<L} s_l(x)``
on how far the penultimate activation can move inside ``B(x, eps)``, the
exact gap ``z_y - z_i`` anywhere in the ball is at least

  ``L_iy = max(g_iy - E_iy - R ||D_{L-1} (w_i - w_y)||_2,  IBP_iy)``

where ``g_iy`` is the float32 gap at ``x``, ``D_{L-1}`` deletes the last
layer's constant columns, ``IBP_iy`` is the exact minimum of the gap over the
penultimate box, and ``E_iy`` bounds ``|fl(z_y - z_i) - (z_y - z_i)|`` at
every point of the ball: the float32 rounding of the whole forward pass
(:mod:`lipjax.bounds.rounding`), which grows with the magnitudes summed
(``sum |W| |h| + |b|`` per logit), not with the gap. The example is
*certified* when ``L_iy - E_iy > 0`` for every ``i != y`` (every float32
evaluation ``model.apply(x')`` and the exact network then predict ``y`` on
the whole ball), with every computed quantity rounded the safe way. Any NaN
or inf on the way (logits, margins, norms, their product, the radius scale)
makes it *not* certified.

With ``bound="global"`` the GloRo certificate with global norms is used
instead (no masks, no interval bound; the boxes only bound the rounding),
the baseline of the paper.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipjax.bounds import lipschitz, network, norms, rounding

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Certificate:
  """Result of :func:`certify` for ``B`` examples.

  Attributes:
    predicted: ``(B,)`` int32 argmax of the logits.
    certified: ``(B,)`` bool; ``predicted == y`` and at every point ``x'`` of
      ``B(x, eps)`` both the float32 forward pass ``model.apply`` (on this
      backend and matmul precision, see :mod:`lipjax.bounds.rounding`) and
      the exact network predict ``y`` (with probability
      ``>= 1 - failure_probability`` over the Lanczos start vectors where
      that is nonzero).
    radius: ``(B,)`` certified radius for the label: ``eps`` where certified,
      0 elsewhere (masks hold only inside ``B(x, eps)``, so no larger radius
      is claimed).
    robust_radius: ``(B,)`` certified radius of the *prediction* ``p``:
      ``eps`` where the prediction is certified at ``eps``, else
      ``min(eps, min_i (g_pi - 2 E_pi) / (||D (w_p - w_i)|| prod_{l<L} s_l))``
      (rounding terms as in the module docstring); valid for wrong
      predictions too.
    margin: ``(B,)`` ``min_{i != y} (L_iy - E_iy)``: a lower bound on
      ``fl(z_y(x')) - fl(z_i(x'))`` and on the exact gap over the ball; > 0
      iff certified (``-inf`` where something is not finite).
    lipschitz: ``(B,)`` the bound on the logits' Lipschitz constant used.
    failure_probability: ``(B,)`` probability over the Lanczos start vectors
      that the certificate's norms fail to be upper bounds; 0 where every
      norm used is deterministic (see :func:`lipjax.bound_guarantee`).
    local: ``(B,)`` bool, whether the sound local bound was computed for the
      example. With ``certify(..., triage=True)`` (the default) it is not for
      examples the triage decides: those are reported with the global
      certificate (``lipschitz`` the global bound, ``failure_probability``
      that of the global norms: 0 for built-in layers), which is sound and,
      for an example it certifies, implies the local certificate.
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


def _margins(logits, labels, mat, col, scale, fwd, *, box=None, bias=None,
             rows=None, last_norm=None, depth=1):
  """Lower bounds on ``z_y - z_i`` over the ball, net of float32 rounding.

  Args:
    logits: ``(B, C)`` float32 logits at the centres.
    labels: ``(B,)`` the class ``y`` whose gaps are bounded.
    mat: explicit ``(C, m)`` last-layer matrix, or None (generic last layer).
    col: ``(B, m)`` column mask of the last layer.
    scale: ``(B,)`` bound on ``||h(x') - h(x)||_2`` per unit of ``||D w||``
      (``eps * prod_{l<L} s_l``).
    fwd: ``(e, d, rho)``: bounds on the float32 penultimate activation's
      error over the ball (``(B, m)`` elementwise, ``(B,)`` in l2) and on the
      rounding of the last layer (``(B, C)``), from
      :func:`lipjax.bounds.intervals.propagate`.
    box: ``(lo, hi)``, ``(B, m)`` box of the exact penultimate activation
      over the ball, for the interval lower bound (``mat`` needed).
    bias: ``(C,)`` last-layer bias or None.
    rows: ``(C,)`` bounds on the last layer's row norms (generic last layer).
    last_norm: ``(B,)`` bound on the masked last-layer norm (generic layer).
    depth: number of norms multiplied into ``scale``.

  Returns:
    ``(num, den, margin, other)``: ``num - r * den > 0`` (``den`` without
    ``scale``'s ``eps``) proves robustness of class ``y`` against class ``i``
    at radius ``r <= eps``; ``margin`` ``(B,)`` is ``min_{i != y}`` of the
    certified lower bound on ``fl(z_y(x')) - fl(z_i(x'))`` and on the exact
    gap over the ball (positive iff certified); ``other`` masks ``i != y``.
  """
  u = rounding.U
  v = rounding.operand_roundoff()
  b, c = logits.shape
  e, d, rho = fwd
  lab = labels[:, None]
  other = jnp.arange(c)[None, :] != lab
  gap = jnp.take_along_axis(logits, lab, axis=1) - logits            # (B, C)
  rho_y = jnp.take_along_axis(rho, lab, axis=1)
  if mat is not None:
    m = mat.shape[1]
    diff = pair_terms(mat, col, labels)
    pn = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))                 # (B, C)
    a = mat[None, :, :] - mat[labels][:, None, :]                       # w_i - w_y
    an = jnp.sqrt(jnp.sum(jnp.square(a), axis=-1)) * rounding.upper_factor(m + 4)
    vecs = [e] if box is None else [e, 0.5 * (box[1] - box[0])]
    prods = jnp.einsum("bch,bkh->bkc", jnp.abs(a), jnp.stack(vecs, axis=1))
    prods = prods * rounding.upper_factor(m + 4, v)
    through = jnp.minimum(prods[:, 0], an * d[:, None] * (1 + 4 * u))
    kd = rounding.upper_factor(m + depth + 8)
  else:
    pn = jnp.broadcast_to((jnp.sqrt(2.0) * last_norm)[:, None], (b, c))
    through = (rows[None, :] + rows[labels][:, None]) * d[:, None] * (1 + 4 * u)
    kd = rounding.upper_factor(depth + 8)
  # |fl(z_y - z_i) - (z_y - z_i)| at any point of the ball (centre included).
  err = (through + rho + rho_y) * (1 + 4 * u)
  den = pn * (1.0 + norms.ROUNDING_SLACK) * kd
  delta = scale[:, None] * den
  # Lower bounds on the exact gap over the ball; each chain of float32
  # subtractions of k terms is off by at most k u (sum of |terms|).
  lower = gap - err - delta - 6 * u * (jnp.abs(gap) + err + delta)      # Lipschitz
  num = gap - 2 * err - 6 * u * (jnp.abs(gap) + 2 * err + delta)        # robust radius
  if box is not None:                                                   # intervals
    lo, hi = box
    mid = 0.5 * (lo + hi)
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) + rounding.FLOOR
    zmid = mid @ mat.T                                                  # (B, C)
    amid = zmid - jnp.take_along_axis(zmid, lab, axis=1)                # a . mid
    size = mag @ jnp.abs(mat).T
    size = size + jnp.take_along_axis(size, lab, axis=1)
    if bias is None:
      db = jnp.zeros((b, c), logits.dtype)
    else:
      bb = jnp.broadcast_to(bias, (b, c))
      db = jnp.take_along_axis(bb, lab, axis=1) - bb
      size = size + jnp.abs(bb) + jnp.abs(jnp.take_along_axis(bb, lab, axis=1))
    mag_max = jnp.max(mag, axis=1, keepdims=True)
    err_ibp = (rounding.dot_coefficient(m + 8, v) * size
               + 2 * rounding.underflow_term(m, mag_max))
    ibp = db - amid - prods[:, 1] - err_ibp
    ibp = ibp - 6 * u * (jnp.abs(db) + jnp.abs(amid) + prods[:, 1] + err_ibp)
    lower = jnp.maximum(lower, ibp)
  # The float32 gap at any point of the ball is within err of the exact one.
  slack = lower - err - 3 * u * (jnp.abs(lower) + err)
  margin = jnp.min(jnp.where(other, slack, jnp.inf), axis=1)
  return num, den, margin, other


def certify_arrays(model, variables, x, y, eps, *, bound: str = "local",
                   **options) -> Certificate:
  """Un-batched core of :func:`certify` (jit-compatible; one call, one batch)."""
  x, eps = lipschitz.check_inputs(model, x, eps, variables)
  variables = network.cast_floating(variables, x.dtype)   # the working precision
  b = x.shape[0]
  stages = network.trace(model, variables, tuple(x.shape[1:]), x.dtype)
  last = stages[-1]
  if bound == "local":
    lb = lipschitz.local_lipschitz_bound(model, variables, x, eps, **options)
    layers = lb.layers
    logits = lb.logits
    col = (last._pre(layers[-2].col_mask).reshape(b, -1)  # pylint: disable=protected-access
           if len(layers) > 1 else jnp.ones((b, int(np.prod(x.shape[1:])))))
    inner = jnp.prod(jnp.stack(lb.layer_norms[:-1]), axis=0) if len(layers) > 1 \
        else jnp.ones((b,))
    lo = last._pre(layers[-1].input_lower).reshape(b, -1)  # pylint: disable=protected-access
    hi = last._pre(layers[-1].input_upper).reshape(b, -1)  # pylint: disable=protected-access
    box = (lo, hi)
    lip, fail = lb.bound, lb.failure_probability
    last_norm, last_global = lb.layer_norms[-1], lb.global_norms[-1]
    finite_extra = jnp.all(jnp.isfinite(jnp.stack(lb.layer_norms)), axis=0)
  elif bound == "global":
    if options.get("mode", "sound") != "sound":
      raise ValueError("bound='global' is always sound; do not pass mode")
    options = {k: v for k, v in options.items() if k in ("key", "failure_probability")}
    _, gn = lipschitz.global_lipschitz_bound(model, variables, input_shape=x.shape[1:],
                                             per_layer=True, **options)
    layers = lipschitz.ball_bounds(stages, x, eps, gn)
    logits = model.apply(variables, x)
    inner = jnp.full((b,), jnp.prod(jnp.stack(gn[:-1])) if len(gn) > 1 else 1.0)
    col = jnp.ones((b, int(np.prod(last.layer_in_shape))))
    box = None
    lip = jnp.full((b,), jnp.prod(jnp.stack(gn)))
    probabilistic = any(lipschitz.needs_probabilistic_global(st) for st in stages)
    fail = jnp.full((b,), options.get("failure_probability", 1e-9) if probabilistic
                    else 0.0, jnp.float32)
    last_norm, last_global = jnp.full((b,), gn[-1]), gn[-1]
    finite_extra = jnp.all(jnp.isfinite(jnp.stack(gn)))
  else:
    raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")

  num_classes = logits.shape[-1]
  y = check_labels(y, b, num_classes)
  mat = last.layer.explicit_matrix(last.params)
  predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scale = eps * inner
  fwd = (last._pre(layers[-1].input_error).reshape(b, -1),  # pylint: disable=protected-access
         layers[-1].input_error_l2, layers[-1].rounding)
  rows = None
  if mat is None:
    rows = lipschitz.row_norm_bounds(last, last_global)
  bias = last.layer.bias(last.params)

  def for_labels(labels):
    return _margins(logits, labels, mat, col, scale, fwd,
                    box=box if mat is not None else None, bias=bias, rows=rows,
                    last_norm=last_norm, depth=len(stages))

  _, _, margin, _ = for_labels(y)
  # Any NaN or inf on the way means "not certified".
  finite = (jnp.all(jnp.isfinite(logits), axis=1) & jnp.isfinite(margin)
            & jnp.isfinite(scale) & jnp.isfinite(lip) & finite_extra)
  certified = (predicted == y) & (margin > 0) & finite
  radius = jnp.where(certified, eps, 0.0)

  num_p, den_p, margin_p, other_p = for_labels(predicted)   # for robust_radius
  denom = den_p * inner[:, None]
  ratio = jnp.where(other_p, jnp.maximum(num_p, 0.0) / jnp.maximum(denom, 1e-30), jnp.inf)
  ratio = jnp.where(other_p & (denom <= 0), jnp.where(num_p > 0, jnp.inf, 0.0), ratio)
  rr = jnp.clip(jnp.min(ratio, axis=1) * (1.0 - 16 * rounding.U), 0.0, eps)
  rr = jnp.where(margin_p > 0, eps, rr)
  rr = jnp.where(finite & jnp.isfinite(rr) & jnp.isfinite(margin_p), rr, 0.0)
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
    model: a :class:`lipjax.nn.Sequential`.
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
  if triage_steps < 2:
    raise ValueError(f"triage_steps must be >= 2, got {triage_steps}")
  x, eps = lipschitz.check_inputs(model, x, eps, variables)
  n = x.shape[0]
  num_classes = network.trace(model, variables, tuple(x.shape[1:]),
                              x.dtype)[-1].out_shape[0]
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
  glob_opts = {k: v for k, v in options.items() if k == "failure_probability"}
  glob = _certify_chunks(model, variables, x, y, eps, "global", batch_size,
                         jax.random.fold_in(key, 1), jit, glob_opts)
  undecided = np.asarray((glob.predicted == y) & ~glob.certified)
  idx = np.nonzero(undecided)[0]
  if idx.size:
    lower_opts = dict(options, mode="lower", lanczos_steps=steps)
    lower_opts.pop("dense", None)
    low = _certify_chunks(model, variables, x[idx], y[idx], eps[idx], "local", batch_size,
                          jax.random.fold_in(key, 2), jit, lower_opts, bucket=True)
    # A margin that is not positive with the lower estimates cannot be with
    # the sound bound. A non-finite lower run (margin -inf, e.g. an overflow
    # in the estimates) stays undecided: the sound run decides.
    hopeless = np.asarray((low.margin <= 0) & jnp.isfinite(low.margin))
    idx = idx[~hopeless]
  if not idx.size:
    return glob
  sound = _certify_chunks(model, variables, x[idx], y[idx], eps[idx], "local", batch_size,
                          jax.random.fold_in(key, 3), jit, options, bucket=True)
  ji = jnp.asarray(idx)
  return jax.tree_util.tree_map(lambda g, s: g.at[ji].set(s.astype(g.dtype)), glob, sound)


def _call_plain(model, bound, options, variables, x, y, eps, key):
  return certify_arrays(model, variables, x, y, eps, bound=bound, key=key, **options)
