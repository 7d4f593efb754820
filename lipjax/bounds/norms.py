"""Deterministic spectral-norm upper bounds.

* :func:`dense_global_norm` -- ``||W||_2`` by a singular value decomposition.
* :func:`top_singular_value` -- the largest singular value of a batch of
  matrices (float64 on the host, differentiable).
* :func:`conv_global_norm` -- ``||conv||_2`` of a zero-padded, strided 2-D
  convolution by the exact norm of a circulant operator that contains it
  (polyphase decomposition + FFT, one small SVD per frequency).
* :func:`masked_dense_norm` -- ``||D_r W D_c||_2`` per example for an explicit
  matrix, by a float64 eigensolver on the host.

Every function returns a value multiplied by ``1 + ROUNDING_SLACK`` to cover
float32 rounding in the computation itself. The guarantees are otherwise exact
(no randomness).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: Relative margin added to every computed norm to cover float32 rounding.
ROUNDING_SLACK = 1e-4


def _host_top_singular(mats):
  """Host side of :func:`top_singular_value`: float64 LAPACK, one call."""
  m = np.asarray(mats)
  complex_in = np.iscomplexobj(m)
  m = m.astype(np.complex128 if complex_in else np.float64)
  out_dtype = np.complex64 if complex_in else np.float32
  rows, cols = m.shape[1], m.shape[2]
  if not np.all(np.isfinite(m)):
    return (np.float32(np.nan), np.int32(0), np.zeros(rows, out_dtype),
            np.zeros(cols, out_dtype))
  mh = np.conj(np.swapaxes(m, 1, 2))
  gram = m @ mh if rows <= cols else mh @ m
  lam = np.linalg.eigvalsh(gram)[:, -1]
  i = int(np.argmax(lam))
  u, sv, vh = np.linalg.svd(m[i])
  sigma = max(float(sv[0]), float(np.sqrt(max(lam[i], 0.0))))
  return (np.float32(sigma * (1.0 + ROUNDING_SLACK)), np.int32(i),
          u[:, 0].astype(out_dtype), np.conj(vh[0]).astype(out_dtype))


def top_singular_value(mats: Array) -> Array:
  """Upper bound on ``max_i sigma_max(mats[i])``, with the gradient of ``sigma_max``.

  The value is computed on the host (``jax.pure_callback``) in float64 with
  LAPACK, then multiplied by ``1 + ROUNDING_SLACK``; no LAPACK call runs inside
  the XLA computation (batched LAPACK kernels there have been seen to
  deadlock when two computations run at once on the CPU). The derivative is
  that of the top singular value, ``Re(u^H dM_i v)`` at the maximising matrix
  and its top singular vectors. NaN or inf entries give NaN.

  Args:
    mats: ``(N, m, n)`` real or complex matrices.

  Returns:
    A float32 scalar.
  """
  _, rows, cols = mats.shape
  vec_dtype = jnp.complex64 if jnp.iscomplexobj(mats) else jnp.float32
  shapes = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((rows,), vec_dtype), jax.ShapeDtypeStruct((cols,), vec_dtype))
  sigma, i, u, v = jax.pure_callback(_host_top_singular, shapes, jax.lax.stop_gradient(mats),
                                     vmap_method="sequential")
  mi = jax.lax.dynamic_index_in_dim(mats, i, axis=0, keepdims=False)
  lin = jnp.real(jnp.vdot(u, mi @ v))
  return sigma + (lin - jax.lax.stop_gradient(lin))


def dense_global_norm(kernel: Array) -> Array:
  """Upper bound on the spectral norm of a dense kernel of shape ``(in, out)``.

  Exact largest singular value (float64 on the host, see
  :func:`top_singular_value`) times ``1 + ROUNDING_SLACK``; differentiable.
  """
  return top_singular_value(kernel.astype(jnp.float32)[None])


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

  Args:
    kernel: ``(k, k, C_in, C_out)`` (HWIO).
    spatial: ``(H, W)`` of the layer's input.
    stride: the convolution's stride ``s``.
    padding: zero padding on every side.

  Returns:
    A scalar ``>= ||conv||_2``.
  """
  kh, kw, cin, cout = kernel.shape
  s = int(stride)
  ka_h, ka_w = -(-kh // s), -(-kw // s)
  m_h = max(-(-(int(spatial[0]) + 2 * padding) // s), ka_h)
  m_w = max(-(-(int(spatial[1]) + 2 * padding) // s), ka_w)
  k = jnp.pad(kernel.astype(jnp.float32),
              ((0, ka_h * s - kh), (0, ka_w * s - kw), (0, 0), (0, 0)))
  # k[s*a1 + b1, s*a2 + b2, ci, co] -> poly[a1, a2, (b1, b2, ci), co]
  k = k.reshape(ka_h, s, ka_w, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  k = k.reshape(ka_h, ka_w, s * s * cin, cout)
  khat = jnp.fft.fft2(k, s=(m_h, m_w), axes=(0, 1))
  mats = khat.reshape(m_h * m_w, s * s * cin, cout)
  return top_singular_value(mats)


def _masked_norm_one(m, rows, cols):
  """``||m[rows][:, cols]||_2`` in float64 (NaN for non-finite entries)."""
  mb = m[rows][:, cols]
  if not np.all(np.isfinite(mb)):
    return np.nan
  if mb.size == 0:
    return 0.0
  g = mb @ mb.T if mb.shape[0] <= mb.shape[1] else mb.T @ mb
  return np.sqrt(max(np.linalg.eigvalsh(g)[-1], 0.0))


_POOL = None


def _host_pool():
  """Worker threads for per-example host work (LAPACK releases the GIL)."""
  global _POOL
  if _POOL is None:
    try:
      workers = len(os.sched_getaffinity(0))
    except AttributeError:
      workers = os.cpu_count() or 1
    _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(workers, 1),
                                                  thread_name_prefix="lipjax-host")
  return _POOL


@contextlib.contextmanager
def _one_blas_thread():
  """Limits BLAS/LAPACK to one thread per call, when threadpoolctl is installed.

  Yields True when the limit is in place. The per-example problems here are
  small (a few hundred rows): a multi-threaded BLAS gains little on them and,
  on a loaded machine, its threads' synchronisation can make a call ten times
  slower. Examples then run in parallel, one per core.
  """
  try:
    from threadpoolctl import threadpool_limits  # pylint: disable=import-outside-toplevel
  except ImportError:
    yield False
    return
  with threadpool_limits(limits=1, user_api="blas"):
    yield True


def _host_masked_dense_norm(matrix, rows, cols):
  m = np.asarray(matrix, np.float64)
  rows = np.asarray(rows, np.float64) > 0
  cols = np.asarray(cols, np.float64) > 0
  one = lambda b: _masked_norm_one(m, rows[b], cols[b])
  with _one_blas_thread() as limited:
    if limited and rows.shape[0] > 1:
      out = list(_host_pool().map(one, range(rows.shape[0])))
    else:
      out = [one(b) for b in range(rows.shape[0])]
  out = np.asarray(out, np.float64)
  return (out * (1.0 + ROUNDING_SLACK)).astype(np.float32)


def masked_dense_norm(matrix: Array, rows: Array, cols: Array) -> Array:
  """Deterministic upper bound on ``||diag(rows) W diag(cols)||_2`` per example.

  Computed on the host in float64: the submatrix of varying rows and columns
  is extracted, and the largest eigenvalue of its Gram matrix (in the smaller
  dimension) is found with LAPACK's symmetric eigensolver. The result is
  multiplied by ``1 + ROUNDING_SLACK`` before it is returned as float32.
  Works under ``jit`` (through ``jax.pure_callback``), not under ``grad``.

  Args:
    matrix: explicit ``(out, in)`` matrix ``W``.
    rows: ``(B, out)`` 0/1 row mask.
    cols: ``(B, in)`` 0/1 column mask.

  Returns:
    ``(B,)`` float32 upper bounds.
  """
  shape = jax.ShapeDtypeStruct((rows.shape[0],), jnp.float32)
  return jax.pure_callback(_host_masked_dense_norm, shape,
                           jax.lax.stop_gradient(matrix), rows, cols,
                           vmap_method="sequential")


def explicit_jacobian(fn, in_shape: Tuple[int, ...]) -> Array:
  """The ``(out_size, in_size)`` matrix of a linear map on one example."""
  size = math.prod(in_shape)
  basis = jnp.eye(size, dtype=jnp.float32).reshape((size,) + tuple(in_shape))
  out = fn(basis)
  return out.reshape(size, -1).T
