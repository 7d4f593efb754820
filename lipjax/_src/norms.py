"""Deterministic spectral-norm upper bounds.

* :func:`dense_global_norm` -- ``||W||_2`` of a dense kernel.
* :func:`top_singular_value` -- the largest singular value of a batch of
  matrices (float64 on the host, differentiable).
* :func:`conv_global_norm` -- ``||conv||_2`` of a zero-padded, strided 2-D
  convolution by the exact norm of a circulant operator that contains it
  (polyphase decomposition + discrete Fourier transform, the largest
  eigenvalue of one small Gram matrix per frequency).
* :func:`masked_dense_norm` -- ``||D_r W D_c||_2`` per example for an explicit
  matrix, by a float64 eigensolver on the host.

The host computations run in float64 and add an explicit bound on their own
float64 rounding (Gram matrices, eigensolver, Fourier sums; relative ~1e-9 at
most for the layer sizes of the model zoo). Every function then multiplies
its value by ``1 + ROUNDING_SLACK``. The guarantees are otherwise exact (no
randomness). The values come back in the working precision of the inputs
(float32, or float64 for float64 inputs under ``jax.enable_x64``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import math
import os
import threading
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

try:   # BLAS threads are limited to one per host call when this is available.
  import threadpoolctl
except ImportError:   # pragma: no cover - optional dependency
  threadpoolctl = None

Array = jax.Array

#: Relative margin added to every computed norm to cover float32 rounding.
ROUNDING_SLACK = 1e-4

_EPS64 = float(np.finfo(np.float64).eps)
_CHUNK_BYTES = 1 << 25          # matrices per host work item (32 MiB of complex128)
_MAX_WORKERS = 8
_BLAS = None
_BLAS_USERS = 0
_BLAS_LOCK = threading.Lock()


def _real_dtype(dtype) -> jnp.dtype:
  """float32, or float64 where ``dtype`` is a (complex) float64 type."""
  dt = jnp.dtype(dtype)
  wide = dt in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _complex_of(real_dtype) -> jnp.dtype:
  return jnp.dtype(jnp.complex128 if real_dtype == jnp.float64 else jnp.complex64)


@contextlib.contextmanager
def _single_blas_thread():
  """Limits BLAS/LAPACK to one thread while host batches run.

  The host work is many small matrices: a multithreaded BLAS spends far more
  on synchronising its threads than on arithmetic there (10x slower on a busy
  two-core machine); the chunks run in parallel in Python threads instead.
  Reference-counted, so that host calls that XLA runs concurrently restore
  the user's setting only when the last one ends.
  """
  global _BLAS, _BLAS_USERS
  if threadpoolctl is None:
    yield
    return
  with _BLAS_LOCK:
    if _BLAS_USERS == 0:
      _BLAS = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    _BLAS_USERS += 1
  try:
    yield
  finally:
    with _BLAS_LOCK:
      _BLAS_USERS -= 1
      if _BLAS_USERS == 0:
        _BLAS.restore_original_limits()
        _BLAS = None


def _map_chunks(fn, chunks):
  """``[fn(c) for c in chunks]``, on a few threads (numpy's LAPACK calls release the GIL)."""
  workers = min(len(chunks), os.cpu_count() or 1, _MAX_WORKERS)
  with _single_blas_thread():
    if workers <= 1:
      return [fn(c) for c in chunks]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return list(pool.map(fn, chunks))


# float64 travels to and from the host callbacks as raw bits: the callbacks
# run on XLA's threads, where a thread-local ``jax.enable_x64`` context is not
# active, so JAX would round float64 arguments and results to float32 there.
_WIDE = {np.dtype(np.float64): 0, np.dtype(np.complex128): 1}


def _encode_jax(a: Array) -> Array:
  dt = np.dtype(a.dtype)
  if dt not in _WIDE:
    return a
  if _WIDE[dt]:
    a = jnp.stack([jnp.real(a), jnp.imag(a)], axis=-1)
  return jax.lax.bitcast_convert_type(a, jnp.uint32)


def _decode_jax(a: Array, dtype) -> Array:
  dt = np.dtype(dtype)
  if dt not in _WIDE:
    return a
  a = jax.lax.bitcast_convert_type(a, jnp.float64)
  return jax.lax.complex(a[..., 0], a[..., 1]) if _WIDE[dt] else a


def _wire(shape_dtype):
  """The ``ShapeDtypeStruct`` that carries ``shape_dtype`` across the callback."""
  dt = np.dtype(shape_dtype.dtype)
  if dt not in _WIDE:
    return shape_dtype
  return jax.ShapeDtypeStruct(tuple(shape_dtype.shape) + (2,) * (1 + _WIDE[dt]), jnp.uint32)


def _decode_host(a, dtype):
  a = np.asarray(a)
  dt = np.dtype(dtype)
  if dt not in _WIDE:
    return a
  a = np.ascontiguousarray(a).view(np.float64)[..., 0]
  return a[..., 0] + 1j * a[..., 1] if _WIDE[dt] else a


def _encode_host(a, dtype):
  dt = np.dtype(dtype)
  a = np.asarray(a, dt)
  if dt not in _WIDE:
    return a
  if _WIDE[dt]:
    a = np.stack([a.real, a.imag], axis=-1)
  a = np.array(a, np.float64)   # a C-contiguous copy that keeps 0-d shapes
  return a.reshape(a.shape + (1,)).view(np.uint32)


def _host_call(fn, result_shapes, *args):
  """``jax.pure_callback(fn, result_shapes, *args)`` that keeps float64 exact.

  ``fn`` receives numpy arrays of the arguments' dtypes and returns arrays of
  ``result_shapes``' dtypes, whatever the x64 setting of the thread XLA runs
  it on. Arguments are taken under ``stop_gradient``.
  """
  in_dtypes = tuple(np.dtype(a.dtype) for a in args)
  out_dtypes = tuple(np.dtype(r.dtype) for r in result_shapes)

  def host(*wire_args):
    vals = fn(*(_decode_host(a, d) for a, d in zip(wire_args, in_dtypes)))
    return tuple(_encode_host(v, d) for v, d in zip(vals, out_dtypes))

  wire = jax.pure_callback(host, tuple(_wire(r) for r in result_shapes),
                           *(_encode_jax(jax.lax.stop_gradient(a)) for a in args),
                           vmap_method="sequential")
  return tuple(_decode_jax(w, d) for w, d in zip(wire, out_dtypes))


def _gram(m):
  """``(G, left)``: ``m m^H`` if the rows are fewer (``left``), else ``m^H m``."""
  mh = np.conj(np.swapaxes(m, -1, -2))
  if m.shape[-2] <= m.shape[-1]:
    return m @ mh, True
  return mh @ m, False


def _top_of_chunk(m):
  """``(largest eigenvalue, index, max squared Frobenius norm)`` of the Grams of ``m``."""
  g, _ = _gram(m)
  lam = np.linalg.eigvalsh(g)[:, -1]
  fro2 = np.einsum("bii->b", g).real
  i = int(np.argmax(lam))
  return float(lam[i]), i, float(np.max(fro2))


def _top_vectors(m):
  """Unit top singular vectors ``(u, v)`` of one matrix, from its smaller Gram."""
  g, left = _gram(m)
  _, vecs = np.linalg.eigh(g)
  top = vecs[:, -1]
  other = np.conj(m.T) @ top if left else m @ top
  nrm = np.linalg.norm(other)
  if nrm > 0:
    other = other / nrm
  else:   # m = 0: any unit vector
    other = np.zeros_like(other)
    if other.size:
      other[0] = 1.0
  return (top, other) if left else (other, top)


def _eig_rounding(inner: int, n: int, fro2: float) -> float:
  """Bound on the float64 error of ``lambda_max(m m^H)`` computed as above.

  The Gram's entries carry at most ``gamma_inner |m| |m|^H`` (so at most
  ``~inner * eps * ||m||_F^2`` in norm) and a backward-stable symmetric
  eigensolver adds ``~n * eps * ||G||``; a factor 16 covers complex
  arithmetic and the constants.
  """
  return 16.0 * (inner + n + 4) * _EPS64 * fro2


def _host_top_of_batches(chunks, make, out_real, out_vec):
  """Shared host core: the largest ``sigma_max`` over every matrix of every chunk.

  ``make(c)`` returns chunk ``c``'s ``(N_c, p, q)`` float64/complex128 matrices.
  Returns ``(sigma, chunk, index, u, v)`` where ``sigma`` includes the float64
  rounding bound of the Gram route (not yet ``ROUNDING_SLACK``).
  """
  results = _map_chunks(lambda c: _top_of_chunk(make(c)), chunks)
  best = int(np.argmax([r[0] for r in results]))
  lam, i, _ = results[best]
  fro2 = max(r[2] for r in results)
  m = make(chunks[best])[i]
  p, q = m.shape
  lam = max(lam, 0.0) + _eig_rounding(max(p, q), min(p, q), fro2)
  with _single_blas_thread():
    u, v = _top_vectors(m)
  return math.sqrt(lam), best, i, u.astype(out_vec), v.astype(out_vec)


def _chunks_of(n: int, bytes_per_item: int):
  per = max(1, _CHUNK_BYTES // max(bytes_per_item, 1))
  return [(s, min(s + per, n)) for s in range(0, n, per)]


def _nan_result(rows, cols, out_real, out_vec, *extra):
  return ((out_real.type(np.nan),) + tuple(extra)
          + (np.zeros(rows, out_vec), np.zeros(cols, out_vec)))


def _host_top_singular(mats):
  """Host side of :func:`top_singular_value`: float64 LAPACK on Gram matrices."""
  m = np.asarray(mats)
  complex_in = np.iscomplexobj(m)
  out_real = np.dtype(_real_dtype(m.dtype))
  out_vec = np.dtype(_complex_of(out_real)) if complex_in else out_real
  m = m.astype(np.complex128 if complex_in else np.float64)
  n, rows, cols = m.shape
  if not np.all(np.isfinite(m)):
    return _nan_result(rows, cols, out_real, out_vec, np.int32(0))
  if n == 0 or rows == 0 or cols == 0:
    return (out_real.type(0.0), np.int32(0), np.zeros(rows, out_vec),
            np.zeros(cols, out_vec))
  chunks = _chunks_of(n, m.itemsize * rows * cols)
  sigma, c, i, u, v = _host_top_of_batches(
      chunks, lambda se: m[se[0]:se[1]], out_real, out_vec)
  i = chunks[c][0] + i
  return (out_real.type(sigma * (1.0 + ROUNDING_SLACK)), np.int32(i), u, v)


def top_singular_value(mats: Array) -> Array:
  """Upper bound on ``max_i sigma_max(mats[i])``, with the gradient of ``sigma_max``.

  The value is computed on the host (``jax.pure_callback``) in float64: the
  largest eigenvalue of each matrix's Gram matrix on its smaller side
  (LAPACK, one thread per chunk of matrices), plus a bound on the float64
  rounding of that route, then multiplied by ``1 + ROUNDING_SLACK``. No
  LAPACK call runs inside the XLA computation (batched LAPACK kernels there
  have been seen to deadlock when two computations run at once on the CPU).
  The derivative is that of the returned value, ``(1 + ROUNDING_SLACK)
  Re(u^H dM_i v)`` at the maximising matrix and its top singular vectors.
  NaN or inf entries give NaN.

  Args:
    mats: ``(N, m, n)`` real or complex matrices.

  Returns:
    A scalar: float32, or float64 for float64/complex128 ``mats``.
  """
  _, rows, cols = mats.shape
  real = _real_dtype(mats.dtype)
  vec_dtype = _complex_of(real) if jnp.iscomplexobj(mats) else real
  shapes = (jax.ShapeDtypeStruct((), real), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((rows,), vec_dtype), jax.ShapeDtypeStruct((cols,), vec_dtype))
  sigma, i, u, v = _host_call(_host_top_singular, shapes, mats)
  mi = jax.lax.dynamic_index_in_dim(mats, i, axis=0, keepdims=False)
  lin = jnp.real(jnp.vdot(u, mi @ v))
  return sigma + (1.0 + ROUNDING_SLACK) * (lin - jax.lax.stop_gradient(lin))


def _working(a: Array) -> Array:
  """``a`` in its working precision: float32, or float64 if it is float64."""
  return a.astype(_real_dtype(a.dtype))


def dense_global_norm(kernel: Array) -> Array:
  """Upper bound on the spectral norm of a dense kernel of shape ``(in, out)``.

  Exact largest singular value (float64 on the host, see
  :func:`top_singular_value`) times ``1 + ROUNDING_SLACK``; differentiable.
  """
  return top_singular_value(_working(kernel)[None])


def _phases(freq: int, taps: int, period: int) -> np.ndarray:
  """``exp(-2 pi i freq a / period)`` for ``a < taps``, the product reduced mod ``period``."""
  a = (int(freq) * np.arange(taps)) % period
  return np.exp(-2j * np.pi * a / period)


def _host_conv_top(poly, m_h: int, m_w: int):
  """Host side of :func:`conv_global_norm`.

  ``poly``: ``(a_h, a_w, P, Q)`` polyphase kernel. The real kernel's transform
  satisfies ``K(-w) = conj(K(w))`` (same singular values), so the frequencies
  ``w_2 <= m_w // 2`` cover every value. The transform is an explicit float64
  sum over the few taps (error bounded below), by chunks of ``w_1``.
  """
  k = np.asarray(poly)
  out_real = np.dtype(_real_dtype(k.dtype))
  out_vec = np.dtype(_complex_of(out_real))
  k = k.astype(np.float64)
  a_h, a_w, p, q = k.shape
  if not np.all(np.isfinite(k)):
    return _nan_result(p, q, out_real, out_vec, np.int32(0), np.int32(0))
  half = m_w // 2 + 1
  ph_w = np.stack([_phases(w, a_w, m_w) for w in range(half)])         # (half, a_w)
  k_w = np.einsum("wb,abpq->awpq", ph_w, k)                            # (a_h, half, P, Q)
  ph_h = np.stack([_phases(w, a_h, m_h) for w in range(m_h)])          # (m_h, a_h)

  def make(rows):
    return np.einsum("ca,awpq->cwpq", ph_h[rows[0]:rows[1]], k_w).reshape(-1, p, q)

  chunks = _chunks_of(m_h, 16 * half * p * q)
  sigma, c, i, u, v = _host_top_of_batches(chunks, make, out_real, out_vec)
  w1, w2 = chunks[c][0] + i // half, i % half
  # Fourier sums: |error| <= gamma_{taps+4} sum_a |k_a| entrywise, whose
  # spectral norm is at most sqrt(taps) ||k||_F.
  taps = a_h * a_w
  sigma += 4.0 * (taps + 4) * math.sqrt(taps) * _EPS64 * float(np.linalg.norm(k))
  return (out_real.type(sigma * (1.0 + ROUNDING_SLACK)), np.int32(w1), np.int32(w2), u, v)


def conv_global_norm(kernel: Array, spatial: Sequence[int], stride: int = 1,
                     padding: int = 0) -> Array:
  """Upper bound on the spectral norm of a zero-padded strided convolution.

  The padded input (size ``H + 2p``) embeds isometrically into a periodic grid
  of size ``N = s * M >= H + 2p`` on which the strided correlation becomes,
  after a polyphase split of the input into ``s * s`` sub-grids, a stride-1
  circular correlation from ``s^2 C_in`` to ``C_out`` channels. The finite
  convolution is a restriction of that circulant operator (no wrap-around
  reaches a valid output), so its norm is at most the circulant's, which is
  exactly ``max_omega sigma_max(K_hat(omega))`` over the ``M x M`` grid of
  frequencies.

  The maximum is computed on the host in float64 over half of the
  frequencies (the kernel is real, so ``K_hat(-omega)`` is the conjugate of
  ``K_hat(omega)``), as the largest eigenvalue of each frequency's Gram
  matrix on its smaller side, plus explicit bounds on the float64 rounding
  of the Fourier sums, the Gram matrices and the eigensolver; the result is
  multiplied by ``1 + ROUNDING_SLACK``. The gradient is that of the returned
  value: ``(1 + ROUNDING_SLACK) Re(u^H dK_hat v)`` at the maximising
  frequency and its top singular vectors.

  Args:
    kernel: ``(k, k, C_in, C_out)`` (HWIO), float32 (or float64 under
      ``jax.enable_x64``).
    spatial: ``(H, W)`` of the layer's input.
    stride: the convolution's stride ``s``.
    padding: zero padding on every side.

  Returns:
    A scalar ``>= ||conv||_2`` in the kernel's working precision.
  """
  kh, kw, cin, cout = kernel.shape
  s = int(stride)
  ka_h, ka_w = -(-kh // s), -(-kw // s)
  m_h = max(-(-(int(spatial[0]) + 2 * padding) // s), ka_h)
  m_w = max(-(-(int(spatial[1]) + 2 * padding) // s), ka_w)
  k = jnp.pad(_working(kernel), ((0, ka_h * s - kh), (0, ka_w * s - kw), (0, 0), (0, 0)))
  # k[s*a1 + b1, s*a2 + b2, ci, co] -> poly[a1, a2, (b1, b2, ci), co]
  k = k.reshape(ka_h, s, ka_w, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  k = k.reshape(ka_h, ka_w, s * s * cin, cout)
  real = k.dtype
  cplx = _complex_of(real)
  p = s * s * cin
  shapes = (jax.ShapeDtypeStruct((), real), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((p,), cplx),
            jax.ShapeDtypeStruct((cout,), cplx))
  host = lambda poly: _host_conv_top(poly, m_h, m_w)
  sigma, w1, w2, u, v = _host_call(host, shapes, k)
  # K_hat at the maximising frequency, in JAX, for the derivative.
  ph_h = jnp.exp(-2j * jnp.pi * ((w1 * jnp.arange(ka_h)) % m_h).astype(real) / m_h)
  ph_w = jnp.exp(-2j * jnp.pi * ((w2 * jnp.arange(ka_w)) % m_w).astype(real) / m_w)
  khat = jnp.einsum("a,b,abpq->pq", ph_h.astype(cplx), ph_w.astype(cplx), k.astype(cplx))
  lin = jnp.real(jnp.vdot(u, khat @ v))
  return sigma + (1.0 + ROUNDING_SLACK) * (lin - jax.lax.stop_gradient(lin))


_GRAMS: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()
_GRAMS_LOCK = threading.Lock()


def _full_gram(a: np.ndarray) -> np.ndarray:
  """``a @ a.T`` in float64, kept for the last few matrices.

  The Gram depends only on the parameters, but the host call that needs it
  runs once per chunk: it is keyed by a hash of ``a``'s bytes (never by
  identity), so a matrix that changed in any way gets a new Gram.
  """
  key = (a.shape, hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=32).digest())
  with _GRAMS_LOCK:
    if key in _GRAMS:
      _GRAMS.move_to_end(key)
      return _GRAMS[key]
  with _single_blas_thread():
    g = a @ a.T
  g.flags.writeable = False
  with _GRAMS_LOCK:
    _GRAMS[key] = g
    while len(_GRAMS) > 4:
      _GRAMS.popitem(last=False)
  return g


def _host_masked_dense_norm(matrix, rows, cols):
  out_real = np.dtype(_real_dtype(np.asarray(matrix).dtype))
  m = np.asarray(matrix, np.float64)
  rows = np.asarray(rows, np.float64) > 0
  cols = np.asarray(cols, np.float64) > 0
  # Work with the Gram over the smaller dimension of W: ``a`` is ``(p, q)``
  # with ``p <= q``, its kept lines ``keep_p`` and kept inner entries ``keep_q``.
  if m.shape[0] <= m.shape[1]:
    a, keep_p, keep_q = m, rows, cols
  else:
    a, keep_p, keep_q = m.T, cols, rows
  q = a.shape[1]

  def prefers_update(b):
    """Whether ``G[kp, kp] - A_d A_d^T`` (``d`` the dropped inner entries) is
    cheaper than the Gram of the submatrix itself."""
    kp, kq = int(keep_p[b].sum()), int(keep_q[b].sum())
    small, large = min(kp, kq), max(kp, kq)
    return kp * kp * (q - kq) + kp ** 3 < small * small * large + small ** 3

  def one(b):
    kp, kq = keep_p[b], keep_q[b]
    lines = a[kp]
    mb = lines[:, kq]
    if not np.all(np.isfinite(mb)):
      return np.nan
    if mb.size == 0:
      return 0.0
    if full is not None and prefers_update(b):
      # Entries of the computed G carry at most gamma_q |A||A|^T, the
      # dropped part's gamma_k, the subtraction u (|x| + |y|): together below
      # gamma_{q + k + 3} |A_kp| |A_kp|^T, whose norm is at most the kept
      # lines' squared Frobenius norm over all q entries.
      drop = lines[:, ~kq]
      kept = full[np.ix_(kp, kp)]
      g = kept - drop @ drop.T
      inner, fro2 = q + drop.shape[1] + 3, float(np.trace(kept))
    else:
      g, _ = _gram(mb)
      inner, fro2 = max(mb.shape), float(np.trace(g))
    lam = max(float(np.linalg.eigvalsh(g)[-1]), 0.0)
    lam += _eig_rounding(inner, g.shape[0], fro2)
    return math.sqrt(lam)

  # Examples with the same masks (padding repeats an example; wide balls
  # vary almost everything) share one eigenvalue problem.
  keys = [keep_p[b].tobytes() + keep_q[b].tobytes() for b in range(keep_p.shape[0])]
  first = {}
  for b, k in enumerate(keys):
    first.setdefault(k, b)
  todo = sorted(first.values())
  # Masks that keep most inner entries (wide balls) reuse one full Gram.
  full = None
  if len(todo) > 1 and np.all(np.isfinite(a)) and any(prefers_update(b) for b in todo):
    full = _full_gram(a)
  done = dict(zip(todo, _map_chunks(one, todo)))
  out = np.asarray([done[first[k]] for k in keys], np.float64)
  return (out * (1.0 + ROUNDING_SLACK)).astype(out_real)


def masked_dense_norm(matrix: Array, rows: Array, cols: Array) -> Array:
  """Deterministic upper bound on ``||diag(rows) W diag(cols)||_2`` per example.

  Computed on the host in float64: the largest eigenvalue of the Gram matrix
  of the submatrix of varying rows and columns (in the smaller dimension) is
  found with LAPACK's symmetric eigensolver. When most of the inner
  dimension varies (wide balls), that Gram is formed as the full matrix's
  Gram, computed once per call, restricted to the kept lines, minus the
  Gram of the dropped entries. The result is
  multiplied by ``1 + ROUNDING_SLACK`` (after a bound on the float64
  rounding) before it is returned in the matrix's working precision (float32,
  or float64 for a float64 matrix). Works under ``jit`` (through
  ``jax.pure_callback``), not under ``grad``.

  Args:
    matrix: explicit ``(out, in)`` matrix ``W``.
    rows: ``(B, out)`` 0/1 row mask.
    cols: ``(B, in)`` 0/1 column mask.

  Returns:
    ``(B,)`` upper bounds.
  """
  shape = jax.ShapeDtypeStruct((rows.shape[0],), _real_dtype(matrix.dtype))
  return _host_call(lambda *a: (_host_masked_dense_norm(*a),), (shape,),
                    matrix, rows, cols)[0]


def explicit_jacobian(fn, in_shape: Tuple[int, ...], dtype=jnp.float32) -> Array:
  """The ``(out_size, in_size)`` matrix of a linear map on one example."""
  size = math.prod(in_shape)
  basis = jnp.eye(size, dtype=dtype).reshape((size,) + tuple(in_shape))
  out = fn(basis)
  return out.reshape(size, -1).T
