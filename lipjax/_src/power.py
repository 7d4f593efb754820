"""Matrix-free, batched spectral-norm estimation: power method and Lanczos.

Operators act on a batch: ``op(u)`` maps ``(B, *in_shape)`` to
``(B, *out_shape)`` and is linear, example by example (a masked layer
``u -> D_r W (D_c u)``). The adjoint is obtained with
``jax.linear_transpose``; nothing is materialised.

Two tools with different guarantees:

* :func:`power_iteration` -- a few iterations, warm-startable, for training.
  Its result is an *estimate* (a lower bound of ``||op||``), never a bound.
* :func:`lanczos_norm_bound` -- Lanczos on ``op^T op`` from a Gaussian start,
  returning an *upper bound* that holds with probability at least
  ``1 - delta`` over the start vector (Kuczynski & Wozniakowski 1992, Thm. on
  the Lanczos algorithm: ``P[theta_k < (1 - e) lambda_max] <= 1.648 sqrt(n)
  exp(-sqrt(e) (2k - 1))`` for any symmetric PSD ``n x n`` matrix).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import per_example
from lipjax._src.norms import ROUNDING_SLACK

Array = jax.Array
Operator = Callable[[Array], Array]

_TINY = 1e-30


def normalise(x: Array) -> Array:
  """Each example scaled to unit l2 norm (zero examples stay zero)."""
  return x / per_example.expand(jnp.maximum(per_example.safe_norm(x), _TINY), x)


def _batch_dot(a: Array, b: Array) -> Array:
  return jnp.sum(a * b, axis=tuple(range(1, a.ndim)))


def gaussian(key: Array, shape: Tuple[int, ...], dtype=jnp.float32) -> Array:
  """Standard normal samples of ``shape``, seeded by ``key``.

  Drawn with XLA's counter-based bit generator (``impl="rbg"``) seeded from
  ``key``'s bits, which compiles in a fraction of the time the default
  generator takes on the CPU (a second or more per call site there). The
  samples are standard normal and independent of anything but ``key``: what
  the Lanczos bound's guarantee asks of its start vector.
  """
  data = key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(key)
  data = jnp.ravel(data).astype(jnp.uint32)
  data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4]
  return jax.random.normal(jax.random.wrap_key_data(data, impl="rbg"), shape, dtype)


def adjoint(op: Operator, u_like: Array) -> Operator:
  """The adjoint of the batched linear ``op`` (via ``jax.linear_transpose``)."""
  t = jax.linear_transpose(op, jax.ShapeDtypeStruct(u_like.shape, u_like.dtype))
  return lambda v: t(v)[0]


def power_iteration(op: Operator, u0: Array, iterations: int, *,
                    grad_through: bool = False, tol: Optional[float] = None,
                    adjoint_of: Optional[Operator] = None,
                    final_op: Optional[Operator] = None,
                    adjoint_op: Optional[Operator] = None,
                    loop: bool = False) -> Tuple[Array, Array]:
  """Estimates ``||op||_2`` per example with the power method.

  Args:
    op: batched linear operator.
    u0: ``(B, *in_shape)`` start vectors (random or warm start; need not be
      normalised).
    iterations: number of iterations (unrolled: a few are used in training;
      see ``loop``).
    grad_through: if True, gradients flow through every iteration; otherwise
      the final vector is a constant and only the last application of ``op``
      is differentiated (``||op(stop_gradient(u))||``).
    tol: optional relative tolerance; iterations stop changing the vector once
      the estimate's relative change is below it (per example).
    adjoint_of: another implementation of the same linear map whose
      ``jax.linear_transpose`` gives the adjoint (default: ``op``).
    final_op: the same map for the final ``||op(u)||`` (default: ``op``).
      With ``grad_through=False``, pass ``op`` and ``adjoint_of`` built from
      parameters under ``stop_gradient`` and the live map here: the
      iterations then carry no derivative work at all.
    loop: run the iterations in a ``jax.lax.fori_loop`` (many iterations;
      not with ``grad_through`` or ``tol``).

  Returns:
    ``(sigma, u)``: ``(B,)`` estimates, each a *lower bound* of the true norm
    (up to rounding), and the ``(B, *in_shape)`` final unit vectors to
    warm-start the next call.
  """
  opt = adjoint_op or adjoint(adjoint_of or op, u0)
  u = normalise(u0)
  if not grad_through:
    u = jax.lax.stop_gradient(u)
  if loop:
    if grad_through or tol is not None:
      raise ValueError("loop=True takes neither grad_through nor tol")
    u = jax.lax.fori_loop(0, int(iterations), lambda _, u: normalise(opt(normalise(op(u)))), u)
    iterations = 0
  sigma_prev = None
  for _ in range(int(iterations)):
    v = normalise(op(u))
    u_new = normalise(opt(v))
    if tol is not None and sigma_prev is not None:
      sigma_now = per_example.safe_norm(op(u))
      done = jnp.abs(sigma_now - sigma_prev) <= tol * jnp.maximum(sigma_now, _TINY)
      u_new = jnp.where(per_example.expand(done, u), u, u_new)
      sigma_prev = sigma_now
    elif tol is not None:
      sigma_prev = per_example.safe_norm(op(u))
    u = u_new
    if not grad_through:
      u = jax.lax.stop_gradient(u)
  sigma = per_example.safe_norm((final_op or op)(u))
  return sigma, jax.lax.stop_gradient(u)


def norm_at(op: Operator, u: Array) -> Array:
  """``||op(u)||`` per example (``(B,)``), with a finite gradient at 0."""
  return per_example.safe_norm(op(u))


def _lanczos(matvec: Operator, q0: Array, steps: int,
             settled: Optional[Callable[[Array, Array], Array]] = None,
             block: int = 5) -> Tuple[Array, Array]:
  """``(top Ritz value, completed steps)``, both ``(B,)``.

  An example stops early (its Krylov space is numerically invariant) once the
  new residual falls below ``1e-6`` of the largest ``|alpha|`` seen; its
  count of completed steps is then below ``steps``.

  With ``settled`` the steps run in blocks of ``block``, and before each
  block ``settled(top, done)`` (``(B,)`` bools from the current top Ritz value
  and step counts) is asked: once every live example is settled, the
  remaining blocks are skipped (their count of completed steps stays where
  it is). The Ritz value never decreases as steps are added (the tridiagonal
  matrices are nested), so a test on it holds for every later step too.
  """
  q = normalise(q0)
  alive0 = per_example.safe_norm(q0) > 0
  steps = int(steps)

  def body(carry, index):
    q, q_prev, beta_prev, scale, alive = carry
    real = index < steps                  # False: padding steps of the last block
    alive = alive & real
    w = matvec(q) - per_example.expand(beta_prev, q) * q_prev
    alpha = jnp.where(real, _batch_dot(q, w), 0.0)
    w = w - per_example.expand(alpha, q) * q
    beta = per_example.safe_norm(w)
    scale = jnp.maximum(scale, jnp.abs(alpha))
    counted = alive
    alive = alive & (beta > 1e-6 * scale)
    beta = jnp.where(alive, beta, 0.0)
    safe_beta = per_example.expand(jnp.maximum(beta, _TINY), w)
    q_next = jnp.where(per_example.expand(alive, w), w / safe_beta, 0.0)
    return (q_next, q, beta, scale, alive), (alpha, beta, counted)

  b = q.shape[0]
  init = (q, jnp.zeros_like(q), jnp.zeros((b,), q.dtype), jnp.zeros((b,), q.dtype),
          alive0)
  if settled is None:
    _, (alphas, betas, counted) = jax.lax.scan(body, init, jnp.arange(steps))
    alphas, betas = alphas.T, betas.T  # (B, steps)
    done = jnp.sum(counted.astype(jnp.int32), axis=0)
  else:
    block = max(1, min(int(block), steps))
    blocks = -(-steps // block)
    total = blocks * block

    def run_block(carry):
      state, alphas, betas, done, start = carry
      state, (a, bt, c) = jax.lax.scan(body, state, start + jnp.arange(block))
      alphas = jax.lax.dynamic_update_slice(alphas, a.T, (0, start))
      betas = jax.lax.dynamic_update_slice(betas, bt.T, (0, start))
      return state, alphas, betas, done + jnp.sum(c, axis=0, dtype=jnp.int32), start

    def outer(carry, start):
      state, alphas, betas, done = carry
      top = tridiagonal_top(alphas, betas[:, :-1])
      finished = jnp.all(settled(jnp.maximum(top, 0.0), done) | ~state[4])
      state, alphas, betas, done, _ = jax.lax.cond(
          finished, lambda c: c, run_block, (state, alphas, betas, done, start))
      return (state, alphas, betas, done), None

    zeros = jnp.zeros((b, total), q.dtype)
    (_, alphas, betas, done), _ = jax.lax.scan(
        outer, (init, zeros, zeros, jnp.zeros((b,), jnp.int32)),
        jnp.arange(blocks) * block)
  top = tridiagonal_top(alphas, betas[:, :-1])
  return jnp.where(alive0, jnp.maximum(top, 0.0), 0.0), done


def lanczos_estimate(op: Operator, transpose: Operator, q0: Array, steps: int) -> Array:
  """Estimate from below of ``||op||_2`` per example, from any start vector.

  ``sqrt`` of the top Ritz value of ``op^T op`` after ``steps`` Lanczos steps
  from ``q0``. A Ritz value never exceeds the largest eigenvalue, so the
  result is ``<= ||op||`` whatever ``q0`` is (exact arithmetic; float32 adds
  a relative ``~1e-6``); a start near the top right singular vector makes it
  close in a few steps. No probabilistic statement is attached (compare
  :func:`lanczos_norm_bound`, whose upper bound needs a Gaussian start).

  Args:
    op: batched linear operator.
    transpose: its exact transpose.
    q0: ``(B, *in_shape)`` start vectors (need not be normalised; an example
      whose start is zero gets 0).
    steps: Lanczos steps (``>= 1``).

  Returns:
    ``(B,)`` estimates. One step is the Rayleigh quotient
    ``||op(q0)|| / ||q0||``, computed with ``op`` alone.
  """
  if int(steps) == 1:
    n = per_example.safe_norm(q0)
    return jnp.where(n > 0, per_example.safe_norm(op(q0)) / jnp.maximum(n, _TINY), 0.0)
  top, _ = _lanczos(lambda q: transpose(op(q)), q0, int(steps))
  return jnp.sqrt(top)


def lanczos_ritz_vector(op: Operator, transpose: Operator, q0: Array,
                        steps: int, *, ritz_iterations: int = 3) -> Array:
  """Unit estimate of ``op``'s top right singular vector from a short Lanczos run.

  ``steps`` Lanczos steps on ``op^T op`` from ``q0`` (full
  reorthogonalisation against the kept basis, which ``steps`` small keeps
  cheap), then the top eigenvector of the ``steps x steps`` tridiagonal
  matrix (inverse iteration, pure ``jnp``) mapped back through the
  basis. For the same number of operator applications it comes much closer
  to the top singular vector than the power method (the Ritz value
  converges with the Chebyshev rate). The returned vector carries no
  gradient; ``||op(u)||`` at it is an estimate from below of ``||op||``
  (a Rayleigh quotient), whatever the rounding.

  Args:
    op: batched linear operator ``(B, *in) -> (B, *out)``.
    transpose: its exact transpose.
    q0: ``(B, *in)`` start vectors (an example whose start is zero gets 0).
    steps: Lanczos steps, ``>= 1`` (1: the normalised start itself).
    ritz_iterations: inverse iterations on the small tridiagonal matrix.

  Returns:
    ``(B, *in)`` unit vectors (zero where ``q0`` is zero).
  """
  # The Krylov space has at most as many dimensions as the input: more steps
  # add nothing (and would only lengthen the unrolled program).
  steps = min(int(steps), max(int(np.prod(q0.shape[1:])), 1))
  q = jax.lax.stop_gradient(normalise(q0))
  if steps <= 1:
    return q
  basis, alphas, betas = [q], [], []
  w_prev, beta = jnp.zeros_like(q), jnp.zeros(q.shape[:1], q.dtype)
  for k in range(steps):
    w = transpose(op(basis[-1])) - per_example.expand(beta, q) * w_prev
    alpha = _batch_dot(basis[-1], w)
    w = w - per_example.expand(alpha, q) * basis[-1]
    for b in basis:   # full reorthogonalisation (a handful of vectors)
      w = w - per_example.expand(_batch_dot(b, w), q) * b
    alphas.append(alpha)
    if k == steps - 1:
      break
    beta = per_example.safe_norm(w)
    betas.append(beta)
    w_prev = basis[-1]
    ok = per_example.expand(beta > 1e-6 * jnp.maximum(jnp.abs(alpha), _TINY), q)
    basis.append(jnp.where(ok, w / per_example.expand(jnp.maximum(beta, _TINY), q), 0.0))
  a = jnp.stack(alphas, axis=1)                          # (B, k)
  off = jnp.stack(betas, axis=1)                         # (B, k - 1)
  s = tridiagonal_top_vector(a, off, iterations=ritz_iterations)
  u = sum(per_example.expand(s[:, i], q) * v for i, v in enumerate(basis))
  return jax.lax.stop_gradient(normalise(u))


def tridiagonal_top_vector(diag: Array, off: Array, iterations: int = 3) -> Array:
  """Unit eigenvectors of the largest eigenvalues of symmetric tridiagonal matrices.

  Inverse iteration with the shift just above the largest eigenvalue (from
  :func:`tridiagonal_top`): each iteration solves ``(T - shift I) x = s`` by
  the tridiagonal (Thomas) recurrence, pure ``jnp`` and batched, and
  converges by the ratio of the distances of the shift to the top and the
  second eigenvalue, so a few iterations suffice even for clustered spectra
  (where the power method on ``T`` stalls).

  Args:
    diag: ``(B, k)`` diagonals.
    off: ``(B, k - 1)`` off-diagonals.
    iterations: inverse iterations.

  Returns:
    ``(B, k)`` unit vectors.
  """
  k = diag.shape[1]
  if k == 1:
    return jnp.ones_like(diag)
  top = tridiagonal_top(diag, off)
  scale = jnp.maximum(jnp.max(jnp.abs(diag), axis=1), _TINY)
  shift = top + 1e-6 * scale
  d = diag - shift[:, None]                              # negative definite
  lower = jnp.concatenate([jnp.zeros_like(diag[:, :1]), off], axis=1)   # T[i, i-1]
  upper = jnp.concatenate([off, jnp.zeros_like(diag[:, :1])], axis=1)   # T[i, i+1]

  def solve(rhs):
    # Forward elimination, then back substitution (Thomas algorithm).
    def fwd(carry, inputs):
      c_prev, r_prev = carry
      di, li, ui, bi = inputs
      den = di - li * c_prev
      den = jnp.where(jnp.abs(den) < 1e-30, -1e-30, den)
      c = ui / den
      r = (bi - li * r_prev) / den
      return (c, r), (c, r)
    zeros = jnp.zeros_like(diag[:, 0])
    _, (cs, rs) = jax.lax.scan(fwd, (zeros, zeros), (d.T, lower.T, upper.T, rhs.T))

    def bwd(x_next, inputs):
      c, r = inputs
      x = r - c * x_next
      return x, x
    _, xs = jax.lax.scan(bwd, zeros, (cs, rs), reverse=True)
    return xs.T

  s = jnp.ones_like(diag) / jnp.sqrt(jnp.asarray(k, diag.dtype))
  for _ in range(int(iterations)):
    s = solve(s)
    s = s / jnp.maximum(jnp.linalg.norm(s, axis=1, keepdims=True), _TINY)
  return s


def tridiagonal_top(diag: Array, off: Array, iterations: int = 60) -> Array:
  """Upper end of a bisection bracket of the largest eigenvalue.

  Sturm-sequence bisection on the symmetric tridiagonal matrices with
  ``diag`` ``(B, k)`` and ``off`` ``(B, k - 1)``; pure ``jnp`` (no LAPACK),
  so it vectorises and cannot stall on degenerate inputs. The returned value
  is ``>=`` the largest eigenvalue and within a relative ``~1e-7`` of it.
  """
  absoff = jnp.abs(off)
  pad = jnp.zeros_like(diag[:, :1])
  radius = jnp.concatenate([absoff, pad], 1) + jnp.concatenate([pad, absoff], 1)
  hi = jnp.max(diag + radius, axis=1)
  lo = jnp.max(diag, axis=1)            # a Rayleigh quotient: <= lambda_max
  off2 = jnp.concatenate([pad, jnp.square(off)], 1)
  k = diag.shape[1]

  def count_below(x):                   # number of eigenvalues < x
    def step(d_prev, inputs):
      a, b2 = inputs
      d = a - x - b2 / d_prev
      d = jnp.where(jnp.abs(d) < 1e-30, -1e-30, d)
      return d, d < 0
    _, neg = jax.lax.scan(step, jnp.ones_like(x), (diag.T, off2.T))
    return jnp.sum(neg, axis=0)

  def body(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    all_below = count_below(mid) >= k   # every eigenvalue < mid
    return jnp.where(all_below, lo, mid), jnp.where(all_below, mid, hi)

  lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
  return hi


def kw_relative_error(n: Array, steps, delta: float) -> Array:
  """Smallest ``e`` with ``1.648 sqrt(n) exp(-sqrt(e)(2k - 1)) <= delta``.

  ``k`` is taken as ``steps - 1`` (one fewer than the Krylov dimension), which
  is conservative whichever way the theorem's ``k`` is counted. ``steps`` may
  be an int or an array (per example). Returns values ``>= 1`` (no bound)
  when ``steps`` is too small.
  """
  k = jnp.maximum(jnp.asarray(steps, jnp.float32) - 1.0, 1.0)
  root = jnp.log(1.648 * jnp.sqrt(jnp.maximum(n, 1.0)) / delta) / (2.0 * k - 1.0)
  return jnp.square(jnp.maximum(root, 0.0))


def _settled_at(cap, n: Array, steps: int, delta: float, dtype):
  """``settled(theta, done)`` of :func:`_lanczos`: whether the bound after
  all ``steps`` (at least ``sqrt(theta / (1 - e))`` with the ``steps``-step
  ``e``: theta only grows, and fewer steps only enlarge ``e``) is already at
  or above ``cap``."""
  e_cap = kw_relative_error(n, int(steps), 0.5 * delta)
  limit = jnp.broadcast_to(jnp.asarray(cap, dtype), n.shape) * (1.0 + 1e-6)

  def settled(theta, done):   # pylint: disable=unused-argument
    full = jnp.sqrt(theta / jnp.maximum(1.0 - e_cap, _TINY)) * (1.0 + ROUNDING_SLACK)
    return (e_cap >= 1.0) | (full >= limit)

  return settled


def lanczos_norm_bound(op: Operator, key: Array, in_shape_batch: Tuple[int, ...],
                       col_mask: Array, steps: int, delta: float,
                       rank_bound: Optional[Array] = None,
                       transpose: Optional[Operator] = None,
                       cap: Optional[Array] = None,
                       shared: Optional[Array] = None) -> Tuple[Array, Array]:
  """Probabilistic upper bound on ``||op||_2`` per example.

  Runs Lanczos on ``op^T op`` from ``col_mask * g`` with ``g`` standard
  Gaussian (uniform direction on the sphere of the varying coordinates, of
  dimension ``n = sum(col_mask)``), giving the top Ritz value ``theta``; with
  ``e = kw_relative_error(n, steps, delta)`` the returned
  ``sqrt(theta / (1 - e))`` is ``>= ||op||`` with probability ``>= 1 - delta``
  over the start vector (exact arithmetic; ``inf`` when ``e >= 1``). An
  example whose Lanczos run stops early (numerically invariant Krylov space)
  before its Krylov space fills the ``n`` varying dimensions is judged by the
  steps it completed, with the budget ``delta`` split over the possible
  stopping points. The result carries the relative rounding
  margin ``1e-4`` of :mod:`lipjax._src.norms`.

  Args:
    op: batched linear operator whose input is already column-masked.
    key: PRNG key for the start vector (must not depend on the operator).
    in_shape_batch: ``(B, *in_shape)``.
    col_mask: ``(B, *in_shape)`` 0/1 mask of varying input coordinates.
    steps: Lanczos steps.
    delta: failure probability for this operator.
    rank_bound: optional ``(B,)`` upper bound on the rank of ``op`` (e.g. its
      number of unmasked rows ``r``): the Krylov space of ``op^T op`` then has
      dimension at most ``r + 1``, so a run that completed that many steps
      cannot have stopped too early.
    transpose: optional explicit adjoint ``op^T`` (must be exactly the
      transpose of ``op``); default ``jax.linear_transpose`` of ``op``.
    cap: optional scalar or ``(B,)`` upper bound on ``||op||`` known
      otherwise (e.g. the global norm), which the caller takes the minimum
      with. Steps stop, in blocks of 5, once every example's bound can no
      longer come below it: ``min(upper, cap)`` is then ``cap`` whether or
      not the remaining steps run, as it would be after all of them (the
      Ritz value only grows with more steps, and a run judged by fewer steps
      gets a larger relative error ``e``). The estimate is then the Ritz
      value reached so far.
    shared: optional ``(B - 1,)`` bools (with a scalar ``cap``): the last
      example is a reference operator, and these examples' operators equal
      it (e.g. examples whose masks equal the batch's elementwise maximum,
      the reference's masks). The reference's run, from its own row of the
      Gaussian start, bounds all of them; their own runs count as settled
      from the first step, and the reference's too when no example shares
      it. One loop runs every example and the reference (one compiled loop
      nest, not two).

  Returns:
    ``(upper, estimate)``, both ``(B,)``: the probabilistic upper bound and
    the Ritz estimate ``sqrt(theta)`` (a lower bound).
  """
  dtype = jnp.promote_types(col_mask.dtype, jnp.float32)   # the working precision
  g = gaussian(key, in_shape_batch, dtype) * col_mask
  opt = transpose if transpose is not None else adjoint(op, g)
  n = jnp.sum(col_mask.reshape(col_mask.shape[0], -1), axis=1)
  settled = None if cap is None else _settled_at(cap, n, steps, delta, dtype)
  if shared is not None:
    if cap is None or jnp.ndim(cap) != 0:
      raise ValueError("shared needs a scalar cap")
    members = jnp.concatenate([shared, jnp.zeros((1,), bool)])
    unused = jnp.concatenate([jnp.zeros_like(shared), ~jnp.any(shared, keepdims=True)])
    base = settled
    settled = lambda top, done: base(top, done) | members | unused   # noqa: E731
  theta, done = _lanczos(lambda q: opt(op(q)), g, steps, settled)
  # The number of steps an example completes depends on its start vector, so
  # the failure budget is split over the possible stopping points: half for a
  # run of all ``steps`` or one whose Krylov space reached its largest possible
  # dimension (``n``, or ``rank + 1``: then it cannot grow, and the
  # ``steps``-step bound holds), the other half shared by the earlier stops,
  # each judged by the Krylov dimension it actually reached.
  steps = int(steps)
  e_full = kw_relative_error(n, steps, 0.5 * delta)
  e_early = kw_relative_error(n, done, 0.5 * delta / max(steps - 1, 1))
  full_dim = n if rank_bound is None else jnp.minimum(n, rank_bound + 1.0)
  e = jnp.where((done >= steps) | (done >= full_dim), e_full, e_early)
  upper = jnp.where(e < 1.0, jnp.sqrt(theta / jnp.maximum(1.0 - e, _TINY)), jnp.inf)
  upper = upper * (1.0 + ROUNDING_SLACK)
  est = jnp.sqrt(theta)
  if shared is not None:
    upper = jnp.where(members, upper[-1], upper)
    est = jnp.where(members, jnp.maximum(est, est[-1]), est)
  return upper, est
