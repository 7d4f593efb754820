"""Spectral-norm bounds against explicit matrices and numpy's SVD.

Truth is always the largest singular value (float64 ``numpy.linalg.svd``) of
the explicit matrix of the operator, built from ``jax.jacfwd`` of a plain
``lax.conv_general_dilated`` (or the masked matrix itself).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipjax._src import norms
from lipjax._src import power

# Measured on the configurations below (random Gaussian kernels, 6x6 / 7x7 /
# 6x7 inputs, the seeds used here): conv_global_norm / exact lies in
# [1.0001, 1.51]. The circulant embedding is loosest when the kernel covers
# most of a tiny image: 1.51 for 6x6, k=4, stride 1, no padding (3x3
# outputs); 1.22 for 6x7, k=4, stride 2, no padding (2x3 outputs). With at
# least 4 outputs per side the worst ratio is 1.17, and on 16x16 inputs it is
# 1.034. The lower end is exactly the 1 + ROUNDING_SLACK factor (stride =
# kernel: the circulant is block diagonal and exact). Tolerances leave ~7-30%
# headroom over the measured worst case.
TINY_OUTPUT_LOOSENESS = 1.6      # fewer than 4 outputs along a side
SMALL_IMAGE_LOOSENESS = 1.25     # 6x6 / 7x7 inputs, >= 4 outputs per side
LARGE_IMAGE_LOOSENESS = 1.08     # 16x16 inputs


def conv(kernel, x, stride, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def explicit_conv_matrix(kernel, spatial, stride, padding):
  """``(out, in)`` float64 matrix of the conv on one example, from jacfwd."""
  cin = kernel.shape[2]
  x0 = jnp.zeros(tuple(spatial) + (cin,), jnp.float32)
  jac = jax.jacfwd(lambda x: conv(kernel, x[None], stride, padding)[0])(x0)
  n_out = int(np.prod(jac.shape[:3]))
  return np.asarray(jac, np.float64).reshape(n_out, -1)


def top_sv(m):
  return float(np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)[0])


# ---------------------------------------------------------------------------
# conv_global_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stride,padding,ksize",
                         list(itertools.product((1, 2), (0, 1, 2), (2, 3, 4))))
def test_conv_global_norm_is_an_upper_bound_and_not_too_loose(stride, padding, ksize):
  rng = np.random.default_rng(100 * stride + 10 * padding + ksize)
  for spatial, cin, cout in (((6, 6), 2, 3), ((7, 7), 3, 2), ((6, 7), 2, 4)):
    kernel = jnp.asarray(rng.normal(size=(ksize, ksize, cin, cout)), jnp.float32)
    exact = top_sv(explicit_conv_matrix(kernel, spatial, stride, padding))
    bound = float(norms.conv_global_norm(kernel, spatial, stride, padding))
    assert bound >= exact * (1 + 1e-6), (spatial, bound, exact)
    out_side = (min(spatial) + 2 * padding - ksize) // stride + 1
    slack = SMALL_IMAGE_LOOSENESS if out_side >= 4 else TINY_OUTPUT_LOOSENESS
    assert bound <= slack * exact, (spatial, bound / exact)


@pytest.mark.parametrize("stride,padding,ksize", [(1, 1, 3), (2, 1, 4), (2, 0, 4),
                                                  (1, 0, 4), (3, 1, 3)])
def test_conv_global_norm_is_tight_on_larger_images(stride, padding, ksize):
  rng = np.random.default_rng(7 + ksize)
  kernel = jnp.asarray(rng.normal(size=(ksize, ksize, 2, 3)), jnp.float32)
  exact = top_sv(explicit_conv_matrix(kernel, (16, 16), stride, padding))
  bound = float(norms.conv_global_norm(kernel, (16, 16), stride, padding))
  assert exact * (1 + 1e-6) <= bound <= LARGE_IMAGE_LOOSENESS * exact


def test_conv_global_norm_exact_for_non_overlapping_stride():
  # stride == kernel size: the conv is a block-diagonal map whose norm is the
  # norm of the (k*k*cin, cout) kernel matrix; the bound must be that exactly
  # (times the documented rounding slack).
  rng = np.random.default_rng(3)
  kernel = jnp.asarray(rng.normal(size=(2, 2, 3, 4)), jnp.float32)
  exact = top_sv(np.asarray(kernel).reshape(-1, 4))
  bound = float(norms.conv_global_norm(kernel, (6, 6), 2, 0))
  np.testing.assert_allclose(bound, exact * (1 + norms.ROUNDING_SLACK), rtol=2e-6)


def test_conv_global_norm_with_large_kernel_on_tiny_image():
  # The polyphase kernel is larger than the periodic grid unless it is padded.
  rng = np.random.default_rng(4)
  kernel = jnp.asarray(rng.normal(size=(5, 5, 1, 2)), jnp.float32)
  for stride, padding in ((1, 0), (2, 0), (2, 2), (3, 1)):
    exact = top_sv(explicit_conv_matrix(kernel, (5, 5), stride, padding))
    bound = float(norms.conv_global_norm(kernel, (5, 5), stride, padding))
    assert bound >= exact * (1 + 1e-6), (stride, padding)


def circulant_truth(kernel, spatial, stride, padding):
  """``max_w sigma_max(K_hat(w))`` over the *full* ``M x M`` frequency grid.

  Independent of the library: numpy's FFT of the polyphase kernel and one
  SVD per frequency, in float64.
  """
  k = np.asarray(kernel, np.float64)
  kh, kw, cin, cout = k.shape
  s = stride
  ka_h, ka_w = -(-kh // s), -(-kw // s)
  m_h = max(-(-(spatial[0] + 2 * padding) // s), ka_h)
  m_w = max(-(-(spatial[1] + 2 * padding) // s), ka_w)
  k = np.pad(k, ((0, ka_h * s - kh), (0, ka_w * s - kw), (0, 0), (0, 0)))
  poly = np.zeros((ka_h, ka_w, s * s * cin, cout))
  for a1, a2, b1, b2 in itertools.product(range(ka_h), range(ka_w), range(s), range(s)):
    block = (b1 * s + b2) * cin
    poly[a1, a2, block:block + cin] = k[s * a1 + b1, s * a2 + b2]
  khat = np.fft.fft2(poly, s=(m_h, m_w), axes=(0, 1)).reshape(m_h * m_w, -1, cout)
  return float(np.max(np.linalg.svd(khat, compute_uv=False)[:, 0]))


@pytest.mark.parametrize("spatial,ksize,stride,padding", [
    ((6, 7), 3, 1, 1), ((7, 7), 4, 2, 0), ((9, 6), 3, 3, 1), ((5, 5), 5, 2, 2),
    ((8, 8), 2, 1, 0)])
def test_conv_global_norm_is_the_max_over_every_frequency(spatial, ksize, stride, padding):
  # The bound uses half of the frequencies (conjugate symmetry of a real
  # kernel) and Gram matrices; it must equal the maximum over the full grid
  # of frequencies (odd and even grid sizes, strides 1-3) times the slack.
  rng = np.random.default_rng(ksize * 100 + stride * 10 + padding)
  for cin, cout in ((2, 5), (5, 2)):
    kernel = jnp.asarray(rng.normal(size=(ksize, ksize, cin, cout)), jnp.float32)
    truth = circulant_truth(kernel, spatial, stride, padding)
    bound = float(norms.conv_global_norm(kernel, spatial, stride, padding))
    np.testing.assert_allclose(bound, truth * (1 + norms.ROUNDING_SLACK), rtol=1e-6)
    assert bound >= truth * (1 + 0.9 * norms.ROUNDING_SLACK)


def _fd_grad_check(f, params, seed):
  """jax.grad of a scalar ``f`` against central differences along a random direction."""
  d = jnp.asarray(np.random.default_rng(seed).normal(size=params.shape), params.dtype)
  auto = float(jnp.vdot(jax.grad(f)(params), d))
  h = 1e-6
  fd = (float(f(params + h * d)) - float(f(params - h * d))) / (2 * h)
  return auto, fd


def test_conv_global_norm_float64_value_and_gradient():
  # Under x64 the bound is computed and returned in float64 (the kernel is
  # not rounded to float32 on its way to the host), and its gradient is that
  # of the top singular value at the maximising frequency.
  rng = np.random.default_rng(21)
  with jax.enable_x64(True):
    kernel = jnp.asarray(rng.normal(size=(4, 4, 3, 5)), jnp.float64)
    kernel = kernel + 1e-12 * jnp.asarray(rng.normal(size=kernel.shape))   # not float32
    f = jax.jit(lambda k: norms.conv_global_norm(k, (7, 6), 2, 1))
    val = f(kernel)
    assert val.dtype == jnp.float64
    truth = circulant_truth(np.asarray(kernel), (7, 6), 2, 1)
    np.testing.assert_allclose(float(val), truth * (1 + norms.ROUNDING_SLACK), rtol=1e-12)
    auto, fd = _fd_grad_check(f, kernel, 3)
    assert abs(auto - fd) <= 1e-6 * max(1.0, abs(fd)), (auto, fd)


def test_top_singular_value_complex_batch_float64_gradient():
  rng = np.random.default_rng(22)
  with jax.enable_x64(True):
    mats = jnp.asarray(rng.normal(size=(6, 4, 7)) + 1j * rng.normal(size=(6, 4, 7)))
    truth = float(np.max(np.linalg.svd(np.asarray(mats), compute_uv=False)[:, 0]))
    val = norms.top_singular_value(mats)
    assert val.dtype == jnp.float64
    np.testing.assert_allclose(float(val), truth * (1 + norms.ROUNDING_SLACK), rtol=1e-12)
    re = jnp.real(mats)
    f = lambda r: norms.top_singular_value(r + 1j * jnp.imag(mats))
    auto, fd = _fd_grad_check(f, re, 4)
    assert abs(auto - fd) <= 1e-6 * max(1.0, abs(fd)), (auto, fd)


def test_host_norms_leave_the_blas_thread_setting_as_it_was():
  threadpoolctl = pytest.importorskip("threadpoolctl")
  before = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 4, 4)), jnp.float32)
  jax.block_until_ready(jax.jit(lambda k: norms.conv_global_norm(k, (9, 9), 1, 1)
                                * norms.dense_global_norm(k.reshape(-1, 4)))(kernel))
  assert [i["num_threads"] for i in threadpoolctl.threadpool_info()] == before


# ---------------------------------------------------------------------------
# Dense norms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (1, 6), (12, 12), (300, 40)])
def test_dense_global_norm_matches_svd(shape):
  rng = np.random.default_rng(shape[0] * 31 + shape[1])
  w = rng.normal(size=shape).astype(np.float32)
  exact = top_sv(w)
  got = float(norms.dense_global_norm(jnp.asarray(w)))
  assert got >= exact * (1 + 0.9 * norms.ROUNDING_SLACK)
  assert got <= exact * (1 + 1e-3)


def test_dense_global_norm_float64_gradient():
  # d sigma_max / dW = u v^T: central differences in float64 must agree.
  rng = np.random.default_rng(23)
  with jax.enable_x64(True):
    w = jnp.asarray(rng.normal(size=(30, 8)))
    val = norms.dense_global_norm(w)
    assert val.dtype == jnp.float64
    np.testing.assert_allclose(float(val), top_sv(w) * (1 + norms.ROUNDING_SLACK),
                               rtol=1e-12)
    auto, fd = _fd_grad_check(norms.dense_global_norm, w, 5)
    assert abs(auto - fd) <= 1e-6 * max(1.0, abs(fd)), (auto, fd)


def _masked_matrices():
  rng = np.random.default_rng(11)
  w = rng.normal(size=(7, 9)).astype(np.float32)
  rows = (rng.random((6, 7)) < 0.6).astype(np.float32)
  cols = (rng.random((6, 9)) < 0.6).astype(np.float32)
  rows[0], cols[0] = 1, 1          # unmasked
  rows[1] = 0                      # nothing left
  cols[2] = 0
  rows[3] = 0
  rows[3, 4] = 1                   # a single row
  return w, rows, cols


def test_masked_dense_norm_matches_svd_of_masked_matrix():
  w, rows, cols = _masked_matrices()
  got = np.asarray(norms.masked_dense_norm(jnp.asarray(w), jnp.asarray(rows),
                                            jnp.asarray(cols)))
  assert got.shape == (rows.shape[0],)
  for b in range(rows.shape[0]):
    exact = top_sv(rows[b][:, None] * w * cols[b][None, :])
    assert got[b] >= exact, b
    assert got[b] <= exact * (1 + 1e-3) + 1e-30, b
  assert got[1] == 0 and got[2] == 0
  np.testing.assert_allclose(got[3], np.linalg.norm(w[4] * cols[3]), rtol=2e-4)


def test_masked_dense_norm_solves_each_distinct_mask_pair_once(monkeypatch):
  from lipjax._src import norms as norms_lib
  w, rows, cols = _masked_matrices()
  order = [0, 3, 0, 4, 3, 5, 0]              # repeats, as padding produces
  r2, c2 = rows[order], cols[order]
  c2[6, 0] = 1 - c2[6, 0]                     # same rows as example 0, one column differs
  calls = []
  eig = np.linalg.eigvalsh
  monkeypatch.setattr(norms_lib.np.linalg, "eigvalsh", lambda g: calls.append(1) or eig(g))
  got = np.asarray(norms.masked_dense_norm(jnp.asarray(w), jnp.asarray(r2), jnp.asarray(c2)))
  assert len(calls) == 5                      # 0, 3, 4, 5 and the changed copy of 0
  for b in range(len(order)):
    exact = top_sv(r2[b][:, None] * w * c2[b][None, :])
    assert exact <= got[b] <= exact * (1 + 1e-3), b
  assert got[0] == got[2] and got[1] == got[4]


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_masked_dense_norm_of_nearly_full_masks_matches_svd(shape):
  # Wide balls keep almost every row and column: the Gram is then formed
  # from the full matrix's Gram minus the dropped entries' (both
  # orientations of the smaller dimension), and must stay a tight upper bound.
  rng = np.random.default_rng(5)
  w = rng.normal(size=shape).astype(np.float32)
  b = 5
  rows = (rng.random((b, shape[0])) > 0.05).astype(np.float32)
  cols = (rng.random((b, shape[1])) > 0.05).astype(np.float32)
  rows[0], cols[0] = 1, 1                     # nothing dropped
  cols[1, :] = 1
  cols[1, 7] = 0                              # one inner entry dropped
  rows[2] = 0
  rows[2, 3] = 1                              # a single row: the direct route
  got = np.asarray(norms.masked_dense_norm(jnp.asarray(w), jnp.asarray(rows),
                                            jnp.asarray(cols)))
  for i in range(b):
    exact = top_sv(rows[i][:, None].astype(np.float64) * w * cols[i][None, :])
    assert exact <= got[i] <= exact * (1 + 1.01e-4), (i, got[i] / exact)
  np.testing.assert_allclose(got[0], top_sv(w) * (1 + norms.ROUNDING_SLACK), rtol=1e-6)


def test_masked_dense_norm_never_reuses_the_gram_of_other_parameters():
  # The full matrix's Gram is kept across calls, keyed by the matrix's
  # bytes: a matrix changed in place (one entry) must get its own.
  rng = np.random.default_rng(11)
  w = rng.normal(size=(30, 200)).astype(np.float32)
  rows = (rng.random((4, 30)) > 0.05).astype(np.float32)
  cols = (rng.random((4, 200)) > 0.05).astype(np.float32)
  for step in range(3):
    got = np.asarray(norms.masked_dense_norm(jnp.asarray(w), jnp.asarray(rows),
                                              jnp.asarray(cols)))
    for i in range(4):
      exact = top_sv(rows[i][:, None].astype(np.float64) * w * cols[i][None, :])
      assert exact <= got[i] <= exact * (1 + 1.01e-4), (step, i, got[i] / exact)
    w[np.unravel_index(np.argmax(np.abs(w)), w.shape)] *= 3.0 if step == 0 else 0.1


def test_masked_dense_norm_under_jit_and_vmap():
  w, rows, cols = _masked_matrices()
  eager = norms.masked_dense_norm(jnp.asarray(w), jnp.asarray(rows), jnp.asarray(cols))
  jitted = jax.jit(norms.masked_dense_norm)(jnp.asarray(w), jnp.asarray(rows),
                                             jnp.asarray(cols))
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)


# ---------------------------------------------------------------------------
# Lanczos and the power method on a masked convolution
# ---------------------------------------------------------------------------


B = 3
IN_SHAPE = (6, 6, 2)
STRIDE, PAD = 2, 1


@pytest.fixture(scope="module")
def masked_conv():
  return make_masked_conv()


def make_masked_conv():
  """A batch of masked strided convs ``u -> rows * conv(cols * u)`` and the
  exact norm of each (explicit Jacobian of the masked operator)."""
  rng = np.random.default_rng(5)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 2, 3)), jnp.float32)
  out_shape = conv(kernel, jnp.zeros((1,) + IN_SHAPE), STRIDE, PAD).shape[1:]
  cols = (rng.random((B,) + IN_SHAPE) < 0.7).astype(np.float32)
  rows = (rng.random((B,) + out_shape) < 0.6).astype(np.float32)
  rows[0], cols[0] = 1, 1
  cols, rows = jnp.asarray(cols), jnp.asarray(rows)

  def op(u):
    return rows * conv(kernel, cols * u, STRIDE, PAD)

  exact = []
  for b in range(B):
    single = lambda u, b=b: rows[b] * conv(kernel, (cols[b] * u)[None], STRIDE, PAD)[0]
    jac = jax.jacfwd(single)(jnp.zeros(IN_SHAPE))
    exact.append(top_sv(np.asarray(jac).reshape(-1, int(np.prod(IN_SHAPE)))))
  return op, cols, np.array(exact)


def test_lanczos_upper_bound_holds_and_estimate_is_below(masked_conv):
  op, cols, exact = masked_conv
  for seed in range(3):
    upper, est = power.lanczos_norm_bound(op, jax.random.PRNGKey(seed),
                                           (B,) + IN_SHAPE, cols, 60, 1e-9)
    upper, est = np.asarray(upper), np.asarray(est)
    assert np.all(upper >= exact), (upper, exact)
    assert np.all(est <= exact * (1 + 1e-4)), (est, exact)
    # 60 steps on a <= 72-dimensional space: the Ritz value is converged and
    # the stated slack 1 / sqrt(1 - e) is small.
    np.testing.assert_allclose(est, exact, rtol=1e-4)
    assert np.all(upper <= exact * 1.05), upper / exact


def test_lanczos_without_enough_steps_gives_no_bound(masked_conv):
  op, cols, exact = masked_conv
  upper, est = power.lanczos_norm_bound(op, jax.random.PRNGKey(0), (B,) + IN_SHAPE,
                                         cols, 2, 1e-9)
  assert np.all(np.asarray(est) <= exact * (1 + 1e-4))
  assert np.all(np.isinf(np.asarray(upper)) | (np.asarray(upper) >= exact))


def test_lanczos_all_masked_is_zero(masked_conv):
  op, cols, _ = masked_conv
  zero = jnp.zeros_like(cols)
  upper, est = power.lanczos_norm_bound(op, jax.random.PRNGKey(0), cols.shape, zero,
                                         20, 1e-9)
  np.testing.assert_array_equal(np.asarray(est), 0.0)
  assert np.all(np.asarray(upper) == 0) or np.all(np.isinf(np.asarray(upper)))


def test_lanczos_estimate_is_below_from_any_start_and_exact_from_the_top_vector(masked_conv):
  op, cols, exact = masked_conv
  opt = power.adjoint(op, cols)
  # Arbitrary starts, adversarial ones included (a single coordinate, a
  # vector outside the column mask), never exceed the exact norm.
  starts = [jax.random.normal(jax.random.PRNGKey(1), cols.shape),
            jnp.zeros(cols.shape).at[:, 0, 0, 0].set(1.0), 1.0 - cols]
  est_fn = jax.jit(functools.partial(power.lanczos_estimate, op, opt), static_argnums=1)
  for q0 in starts:
    for steps in (1, 4):
      est = np.asarray(est_fn(q0 * cols, steps))
      assert np.all(est <= exact * (1 + 1e-5)), (est, exact)
  # From the exact top right singular vector of each masked operator, one
  # step gives the norm.
  tops = []
  for b in range(B):
    single = lambda u, b=b: op(jnp.broadcast_to(u, cols.shape))[b]
    jac = np.asarray(jax.jacfwd(single)(jnp.zeros(IN_SHAPE)), np.float64)
    _, _, vt = np.linalg.svd(jac.reshape(-1, int(np.prod(IN_SHAPE))), full_matrices=False)
    tops.append(vt[0].reshape(IN_SHAPE))
  est = np.asarray(est_fn(jnp.asarray(np.stack(tops), jnp.float32), 1))
  np.testing.assert_allclose(est, exact, rtol=1e-4)
  # A zero start gives 0 (no NaN).
  np.testing.assert_array_equal(
      np.asarray(est_fn(jnp.zeros_like(cols), 4)), 0.0)


def test_power_iteration_is_below_and_monotone(masked_conv):
  op, cols, exact = masked_conv
  u0 = jax.random.normal(jax.random.PRNGKey(1), cols.shape) * cols
  prev = np.zeros(B)
  for iters in (0, 1, 3, 10):
    sigma, u = power.power_iteration(op, u0, iters)
    sigma = np.asarray(sigma)
    assert np.all(sigma <= exact * (1 + 1e-5)), (iters, sigma, exact)
    assert np.all(sigma >= prev * (1 - 1e-5)), (iters, sigma, prev)
    prev = sigma
    assert u.shape == u0.shape


def test_power_iteration_converges(masked_conv):
  op, cols, exact = masked_conv
  u0 = jax.random.normal(jax.random.PRNGKey(2), cols.shape) * cols
  sigma20, _ = power.power_iteration(op, u0, 20)
  sigma, u = power.power_iteration(op, u0, 300)
  np.testing.assert_allclose(np.asarray(sigma), exact, rtol=1e-4)
  # Closer to the truth than after 20 iterations (here 20 are 2% off on one
  # example, so this is not vacuous).
  assert np.all(exact - np.asarray(sigma) <= exact - np.asarray(sigma20) + 1e-6 * exact)
  # Warm start from the converged vectors: already converged after 1 step.
  sigma1, _ = power.power_iteration(op, u, 1)
  np.testing.assert_allclose(np.asarray(sigma1), exact, rtol=1e-3)


def test_looped_power_iteration_with_an_explicit_adjoint_matches_svd(masked_conv):
  op, cols, exact = masked_conv
  u0 = jax.random.normal(jax.random.PRNGKey(4), cols.shape) * cols
  transpose = power.adjoint(op, u0)
  calls = []

  def explicit(v):   # the same adjoint, counted: the loop must use it
    calls.append(v.shape)
    return transpose(v)

  sigma, u = jax.jit(lambda u0: power.power_iteration(op, u0, 300, adjoint_op=explicit,
                                                      loop=True))(u0)
  assert calls, "the explicit adjoint was not used"
  np.testing.assert_allclose(np.asarray(sigma), exact, rtol=1e-4)
  ref, _ = power.power_iteration(op, u0, 300, loop=True)
  np.testing.assert_allclose(np.asarray(sigma), np.asarray(ref), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(u).reshape(B, -1), axis=1), 1.0,
                             rtol=1e-5)


def test_power_iteration_tolerance_stops_early_but_stays_below(masked_conv):
  op, cols, exact = masked_conv
  u0 = jax.random.normal(jax.random.PRNGKey(3), cols.shape) * cols
  sigma, _ = power.power_iteration(op, u0, 30, tol=1e-3)
  assert np.all(np.asarray(sigma) <= exact * (1 + 1e-5))
  assert np.all(np.asarray(sigma) >= 0.5 * exact)


def test_tridiagonal_top_matches_eigvalsh():
  rng = np.random.default_rng(9)
  diag = rng.normal(size=(4, 7)).astype(np.float32)
  off = rng.normal(size=(4, 6)).astype(np.float32)
  got = np.asarray(power.tridiagonal_top(jnp.asarray(diag), jnp.asarray(off)))
  for b in range(4):
    t = np.diag(diag[b].astype(np.float64)) + np.diag(off[b], 1) + np.diag(off[b], -1)
    top = np.linalg.eigvalsh(t)[-1]
    assert got[b] >= top - 1e-6 * abs(top)
    np.testing.assert_allclose(got[b], top, rtol=1e-5, atol=1e-6)


def test_tridiagonal_top_vector_matches_eigh():
  rng = np.random.default_rng(10)
  diag = rng.normal(size=(5, 6)).astype(np.float32)
  off = rng.normal(size=(5, 5)).astype(np.float32)
  got = np.asarray(power.tridiagonal_top_vector(jnp.asarray(diag), jnp.asarray(off),
                                                iterations=6))
  for b in range(5):
    t = np.diag(diag[b].astype(np.float64)) + np.diag(off[b], 1) + np.diag(off[b], -1)
    _, vecs = np.linalg.eigh(t)
    top = vecs[:, -1]
    np.testing.assert_allclose(np.linalg.norm(got[b]), 1.0, rtol=1e-5)
    assert abs(float(np.dot(got[b], top))) > 1 - 1e-4, b


def _explicit_ops(mats, in_shape):
  """Batched ``u -> M_b u`` on ``(B, *in_shape)`` and its exact transpose."""
  m = jnp.asarray(mats, jnp.float32)
  op = lambda u: jnp.einsum("bmn,bn->bm", m, u.reshape(u.shape[0], -1))   # noqa: E731
  tr = lambda v: jnp.einsum("bmn,bm->bn", m, v).reshape((v.shape[0],) + in_shape)  # noqa: E731
  return op, tr


@pytest.mark.parametrize("in_shape", [(7,), (3, 2, 2)])
def test_lanczos_ritz_vector_against_svd(in_shape):
  rng = np.random.default_rng(12)
  n = int(np.prod(in_shape))
  mats = rng.normal(size=(4, 9, n))
  mats[3] *= 1e-3                       # a small operator (relative test)
  op, tr = _explicit_ops(mats, in_shape)
  q0 = jnp.asarray(rng.normal(size=(4,) + in_shape), jnp.float32).at[2].set(0.0)
  svals = np.linalg.svd(mats, compute_uv=False)
  vt = np.linalg.svd(mats)[2]
  ritz = jax.jit(power.lanczos_ritz_vector, static_argnums=(0, 1, 3))
  for steps in (3, n + 5):
    u = np.asarray(ritz(op, tr, q0, steps))
    # A zero start gives zero; every other vector is a unit vector whose
    # Rayleigh quotient never exceeds the top singular value.
    assert np.all(u[2] == 0)
    live = [0, 1, 3]
    flat = u.reshape(4, -1)
    np.testing.assert_allclose(np.linalg.norm(flat[live], axis=1), 1.0, rtol=1e-5)
    est = np.linalg.norm(np.einsum("bmn,bn->bm", mats, flat), axis=1)
    assert np.all(est[live] <= svals[live, 0] * (1 + 1e-5)), (steps, est, svals[:, 0])
    if steps >= n:   # the Krylov space is the whole input: the top singular vector
      np.testing.assert_allclose(est[live], svals[live, 0], rtol=1e-4)
      for b in live:
        assert abs(float(np.dot(flat[b], vt[b, 0]))) > 1 - 1e-3, (steps, b)
  # One example alone gives the vector it gets in a batch.
  for steps in (3, n):
    batch = np.asarray(ritz(op, tr, q0, steps))
    for b in (0, 1):
      op1, tr1 = _explicit_ops(mats[b:b + 1], in_shape)
      alone = np.asarray(ritz(op1, tr1, q0[b:b + 1], steps))
      np.testing.assert_allclose(alone[0], batch[b], rtol=1e-4, atol=1e-5)


def test_lanczos_ritz_vector_carries_no_gradient():
  rng = np.random.default_rng(13)
  w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  q0 = jnp.asarray(rng.normal(size=(1, 5)), jnp.float32)

  def f(w):
    u = power.lanczos_ritz_vector(lambda u: u @ w.T, lambda v: v @ w, q0, 4)
    return jnp.sum(u)

  assert float(jnp.max(jnp.abs(jax.jit(jax.grad(f))(w)))) == 0.0


def test_lanczos_stopping_early_is_judged_by_the_steps_it_completed():
  # op = 2 * (a 0/1 mask): op^T op has the eigenvalues 4 and 0 only, so the
  # Krylov space is invariant after 2 steps and the run stops there. The bound
  # must come from the steps actually done, not from the 50 requested: with 2
  # steps the Kuczynski-Wozniakowski bound gives no bound at all (inf), which
  # the local bound then caps by the layer's global norm.
  n, b = 600, 2
  mask = jnp.asarray(np.tile((np.arange(n) % 7 == 0).astype(np.float32), (b, 1)))

  def op(u):
    return 2.0 * u * mask

  ones = jnp.ones((b, n))
  theta, done = power._lanczos(lambda q: power.adjoint(op, ones)(op(q)), ones, 50)
  np.testing.assert_array_equal(np.asarray(done), 2)
  np.testing.assert_allclose(np.asarray(theta), 4.0, rtol=1e-5)
  upper, est = power.lanczos_norm_bound(op, jax.random.PRNGKey(0), (b, n), ones, 50, 1e-9)
  assert np.all(np.isinf(np.asarray(upper))), upper
  np.testing.assert_allclose(np.asarray(est), 2.0, rtol=1e-5)


def test_lanczos_capped_by_a_known_bound_gives_the_same_minimum(masked_conv):
  # cap: steps stop once no example's bound can come below the cap, so
  # min(upper, cap) is what the full run gives; examples below the cap get
  # the full run's bound itself.
  op, cols, exact = masked_conv
  key = jax.random.PRNGKey(3)
  full, est_full = power.lanczos_norm_bound(op, key, cols.shape, cols, 60, 1e-9)
  full = np.asarray(full)
  for cap in (np.full(B, 1e30), exact * 1.5, exact * 1.001, np.array(exact)):
    upper, est = power.lanczos_norm_bound(op, key, cols.shape, cols, 60, 1e-9,
                                           cap=jnp.asarray(cap, jnp.float32))
    upper, est = np.asarray(upper), np.asarray(est)
    np.testing.assert_allclose(np.minimum(upper, cap), np.minimum(full, cap), rtol=1e-6)
    assert np.all(np.minimum(upper, cap) >= exact)
    assert np.all(est <= exact * (1 + 1e-4))
  below = np.full(B, 1e30)
  upper, _ = power.lanczos_norm_bound(op, key, cols.shape, cols, 60, 1e-9,
                                       cap=jnp.asarray(below, jnp.float32))
  np.testing.assert_array_equal(np.asarray(upper), full)


def test_lanczos_shared_reference_bounds_its_members_in_the_same_run():
  # The last example is the reference: the members (examples whose operator
  # equals it) get its bound, the others their own run's, as without sharing;
  # with no member the reference counts as settled (it never holds the
  # others' steps up) and the others' bounds are unchanged.
  n, b = 40, 4
  rng = np.random.default_rng(5)
  mats = rng.normal(size=(b + 1, n, n)).astype(np.float32)
  mats[1] = mats[-1]
  mats[3] = mats[-1]
  mats = jnp.asarray(mats)
  op = lambda u: jnp.einsum("bij,bj->bi", mats, u)   # noqa: E731
  ones = jnp.ones((b + 1, n))
  exact = np.linalg.svd(np.asarray(mats, np.float64), compute_uv=False)[:, 0]
  key = jax.random.PRNGKey(6)
  cap = jnp.float32(1e30)
  alone, est_alone = power.lanczos_norm_bound(op, key, (b + 1, n), ones, 30, 1e-9, cap=cap)
  members = jnp.asarray([False, True, False, True])
  upper, est = power.lanczos_norm_bound(op, key, (b + 1, n), ones, 30, 1e-9, cap=cap,
                                        shared=members)
  upper, alone = np.asarray(upper), np.asarray(alone)
  np.testing.assert_array_equal(upper[[1, 3]], upper[-1])
  np.testing.assert_allclose(upper[[0, 2, 4]], alone[[0, 2, 4]], rtol=1e-6)
  assert np.all(upper >= exact), (upper, exact)
  assert np.all(np.asarray(est) <= exact * (1 + 1e-5))
  none, _ = power.lanczos_norm_bound(op, key, (b + 1, n), ones, 30, 1e-9, cap=cap,
                                     shared=jnp.zeros((b,), bool))
  none = np.asarray(none)
  assert none[-1] >= exact[-1]
  np.testing.assert_allclose(none[:b], alone[:b], rtol=1e-6)
  with pytest.raises(ValueError, match="shared needs a scalar cap"):
    power.lanczos_norm_bound(op, key, (b + 1, n), ones, 30, 1e-9, shared=members)


def test_lanczos_blocks_stop_once_every_example_is_settled():
  # A settled test that is true from the start skips every block (no step
  # is counted); one that never holds runs every step, as without it.
  n, b = 50, 3
  mat = jnp.asarray(np.random.default_rng(2).normal(size=(b, n, n)), jnp.float32)
  gram = lambda q: jnp.einsum("bij,bj->bi", mat, jnp.einsum("bji,bj->bi", mat, q))
  q0 = jax.random.normal(jax.random.PRNGKey(0), (b, n))
  top, done = power._lanczos(gram, q0, 25)
  never, done_never = power._lanczos(gram, q0, 25, settled=lambda t, d: t < 0)
  np.testing.assert_array_equal(np.asarray(done_never), np.asarray(done))
  np.testing.assert_allclose(np.asarray(never), np.asarray(top), rtol=1e-6)
  _, done_now = power._lanczos(gram, q0, 25, settled=lambda t, d: t >= 0)
  np.testing.assert_array_equal(np.asarray(done_now), 0)
  # Settled after the first block of 10 steps: 10 steps counted.
  _, done_one = power._lanczos(gram, q0, 25, settled=lambda t, d: d >= 10)
  np.testing.assert_array_equal(np.asarray(done_one), 10)


def test_one_step_lanczos_estimate_is_the_rayleigh_quotient(masked_conv):
  op, cols, exact = masked_conv
  q0 = jax.random.normal(jax.random.PRNGKey(4), cols.shape) * cols
  one = np.asarray(power.lanczos_estimate(op, power.adjoint(op, cols), q0, 1))
  flat = lambda a: np.asarray(a).reshape(a.shape[0], -1)
  rq = np.linalg.norm(flat(op(q0)), axis=1) / np.linalg.norm(flat(q0), axis=1)
  np.testing.assert_allclose(one, rq, rtol=1e-5)
  assert np.all(one <= exact * (1 + 1e-5))
  zero = np.asarray(power.lanczos_estimate(op, power.adjoint(op, cols), 0 * q0, 1))
  np.testing.assert_array_equal(zero, 0.0)


def test_lanczos_bound_includes_the_rounding_margin(masked_conv):
  op, cols, exact = masked_conv
  upper, est = power.lanczos_norm_bound(op, jax.random.PRNGKey(0), cols.shape, cols,
                                         60, 1e-9)
  e = np.asarray(power.kw_relative_error(jnp.sum(cols.reshape(cols.shape[0], -1), 1),
                                         60, 0.5e-9))
  expected = np.asarray(est) / np.sqrt(1 - e) * (1 + 1e-4)
  np.testing.assert_allclose(np.asarray(upper), expected, rtol=1e-5)


@pytest.mark.parametrize("size,ksize,stride,padding", [
    (7, 4, 2, 1), (8, 4, 2, 1), (7, 3, 2, 0), (9, 3, 3, 1), (6, 5, 2, 2), (5, 2, 2, 0),
    (6, 3, 1, 1)])
def test_conv_polyphase_form_is_the_same_map_and_gives_the_same_adjoint(size, ksize, stride,
                                                                        padding):
  from lipjax import nn as lnn
  from lipjax._src import rules
  module = lnn.Conv(features=3, kernel_size=ksize, stride=stride, padding=padding)
  layer = rules.module_rule(module)   # lipjax.nn.Conv's registered rule
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size + 1, 2))
  params = module.init(jax.random.PRNGKey(1), x)["params"]
  a = layer.forward(params, x)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x)),
                             np.asarray(a + params["bias"]), rtol=1e-5, atol=1e-5)
  b = layer.forward_for_adjoint(params, x)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  v = jax.random.normal(jax.random.PRNGKey(2), a.shape)
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  ta = jax.linear_transpose(lambda u: layer.forward(params, u), spec)(v)[0]
  tb = jax.linear_transpose(lambda u: layer.forward_for_adjoint(params, u), spec)(v)[0]
  np.testing.assert_allclose(np.asarray(tb), np.asarray(ta), rtol=1e-5, atol=1e-5)
  # <W u, v> == <u, W^T v> with the polyphase adjoint.
  np.testing.assert_allclose(float(jnp.vdot(a, v)), float(jnp.vdot(x, tb)), rtol=1e-4)


@pytest.mark.parametrize("size,ksize,stride,padding", [
    (7, 4, 2, 1), (8, 4, 2, 1), (7, 3, 2, 0), (9, 3, 3, 1), (6, 5, 2, 2), (5, 2, 2, 0),
    (6, 3, 1, 1), (6, 3, 1, 0), (6, 3, 1, 2), (5, 1, 1, 0), (7, 5, 3, 3)])
def test_conv_explicit_adjoint_is_the_transpose_of_the_explicit_matrix(size, ksize, stride,
                                                                       padding):
  # Lanczos runs on op^T op with this adjoint: any error in it voids the bound.
  from lipjax import nn as lnn
  from lipjax._src import rules
  module = lnn.Conv(features=3, kernel_size=ksize, stride=stride, padding=padding)
  layer = rules.module_rule(module)
  in_shape = (size, size + 1, 2)
  params = module.init(jax.random.PRNGKey(1), jnp.zeros((1,) + in_shape))["params"]
  mat = explicit_conv_matrix(params["kernel"], in_shape[:2], stride, padding)  # float64
  out = layer.forward(params, jnp.zeros((1,) + in_shape))
  v = jax.random.normal(jax.random.PRNGKey(2), (3,) + out.shape[1:])
  got = np.asarray(layer.adjoint(params, v, in_shape), np.float64)
  want = (np.asarray(v, np.float64).reshape(3, -1) @ mat).reshape((3,) + in_shape)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stage_adjoint_matches_linear_transpose_through_reshapes():
  from lipjax import nn as lnn
  from lipjax._src import trace as trace_lib

  class ToImage(lnn.Reshape):
    def reshape(self, x):
      return x.reshape(x.shape[0], 6, 6, 1)

  model = lnn.Sequential((lnn.Dense(36), lnn.ReLU(), ToImage(), lnn.Conv(4, 4, 2, 1),
                          lnn.ReLU(), lnn.Flatten(), lnn.Dense(3)), input_shape=(8,))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))
  stages = trace_lib.trace(model, v, (8,))
  assert stages[1].reshapes and stages[1].layer.adjoint(
      stages[1].params, jnp.zeros((1, 3, 3, 4)), (6, 6, 1)) is not None
  for st in stages:
    spec = jax.ShapeDtypeStruct((2,) + st.in_shape, jnp.float32)
    z = jax.random.normal(jax.random.PRNGKey(st.index), (2,) + st.out_shape)
    want = jax.linear_transpose(st.linear, spec)(z)[0]
    np.testing.assert_allclose(np.asarray(st.adjoint(z)), np.asarray(want), rtol=1e-5,
                               atol=1e-6)


def test_lanczos_rank_bound_accepts_a_krylov_space_that_cannot_grow():
  # op = diag(3, 1) Q with Q 2 x 600 orthonormal: op^T op has rank 2, so the
  # Krylov space has dimension <= 3 and the run stops after 3 steps. Knowing
  # rank <= 2 (two unmasked rows), that stop is genuine and the 50-step bound
  # applies; without the rank it is judged by 3 steps (no bound).
  rng = np.random.default_rng(1)
  n, b = 600, 2
  q = np.linalg.qr(rng.standard_normal((n, 2)))[0].T.astype(np.float32)   # (2, n)
  mat = jnp.asarray(np.diag([3.0, 1.0]).astype(np.float32) @ q)

  def op(u):
    return u @ mat.T

  ones = jnp.ones((b, n))
  up_rank, est = power.lanczos_norm_bound(op, jax.random.PRNGKey(0), (b, n), ones, 50, 1e-9,
                                           rank_bound=jnp.full((b,), 2.0))
  np.testing.assert_allclose(np.asarray(est), 3.0, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(up_rank)))
  assert np.all(np.asarray(up_rank) >= 3.0) and np.all(np.asarray(up_rank) <= 3.0 * 1.05)
  up, _ = power.lanczos_norm_bound(op, jax.random.PRNGKey(0), (b, n), ones, 50, 1e-9)
  assert np.all(np.isinf(np.asarray(up)))
