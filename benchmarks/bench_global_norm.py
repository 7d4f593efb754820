r"""Global spectral-norm bounds of the model zoo: the host method vs the previous one.

Run::

  python benchmarks/bench_global_norm.py --models=8c2f,6c2f,4c3f --repeats=3

For randomly initialised 8C2F (TinyImageNet, 64x64x3, 200 classes), 6C2F
(CIFAR-10, 32x32x3) and 4C3F (MNIST, 28x28x1), times every linear layer's
global norm bound (jitted, after compilation; median of ``--repeats`` calls)
two ways in the same process:

* ``new``: :func:`lipjax._src.norms.conv_global_norm` / ``dense_global_norm`` as
  shipped: half of the frequencies (conjugate symmetry of a real kernel), a
  float64 Fourier sum on the host, the largest eigenvalue of each
  frequency's Gram matrix on its smaller side with single-threaded LAPACK
  calls over chunks run on a few threads, and the top singular vectors from
  one small eigenproblem;
* ``old``: the previous method, kept here as the baseline: the XLA FFT over
  every frequency, float64 Gram matrices and ``eigvalsh`` on the host with the
  default BLAS threading, then a full SVD of the maximising matrix.

It prints a table per model (per-layer and total seconds, the speed-up, and
the relative difference of the two values, which must stay at float64
rounding level), then the first (compiling) and a warm call of
``global_lipschitz_bound``. ``--skip_old`` times only the new method.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lipjax
from lipjax import nn as lnn
from lipjax._src import norms
from lipjax._src import trace as trace_lib

NUM_CLASSES = {"8c2f": 200, "6c2f": 10, "4c3f": 10, "2c2f": 10}


# --- the previous method (baseline) ---------------------------------------


def _old_host_top_singular(mats):
  m = np.asarray(mats)
  complex_in = np.iscomplexobj(m)
  m = m.astype(np.complex128 if complex_in else np.float64)
  out_dtype = np.complex64 if complex_in else np.float32
  rows, cols = m.shape[1], m.shape[2]
  mh = np.conj(np.swapaxes(m, 1, 2))
  gram = m @ mh if rows <= cols else mh @ m
  lam = np.linalg.eigvalsh(gram)[:, -1]
  i = int(np.argmax(lam))
  u, sv, vh = np.linalg.svd(m[i])
  sigma = max(float(sv[0]), float(np.sqrt(max(lam[i], 0.0))))
  return (np.float32(sigma * (1.0 + norms.ROUNDING_SLACK)), np.int32(i),
          u[:, 0].astype(out_dtype), np.conj(vh[0]).astype(out_dtype))


def _old_top_singular_value(mats):
  _, rows, cols = mats.shape
  vec_dtype = jnp.complex64 if jnp.iscomplexobj(mats) else jnp.float32
  shapes = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((rows,), vec_dtype), jax.ShapeDtypeStruct((cols,), vec_dtype))
  sigma, i, u, v = jax.pure_callback(_old_host_top_singular, shapes,
                                     jax.lax.stop_gradient(mats), vmap_method="sequential")
  mi = jax.lax.dynamic_index_in_dim(mats, i, axis=0, keepdims=False)
  lin = jnp.real(jnp.vdot(u, mi @ v))
  return sigma + (lin - jax.lax.stop_gradient(lin))


def _old_conv_global_norm(kernel, spatial, stride, padding):
  kh, kw, cin, cout = kernel.shape
  s = int(stride)
  ka_h, ka_w = -(-kh // s), -(-kw // s)
  m_h = max(-(-(int(spatial[0]) + 2 * padding) // s), ka_h)
  m_w = max(-(-(int(spatial[1]) + 2 * padding) // s), ka_w)
  k = jnp.pad(kernel.astype(jnp.float32),
              ((0, ka_h * s - kh), (0, ka_w * s - kw), (0, 0), (0, 0)))
  k = k.reshape(ka_h, s, ka_w, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  k = k.reshape(ka_h, ka_w, s * s * cin, cout)
  khat = jnp.fft.fft2(k, s=(m_h, m_w), axes=(0, 1))
  return _old_top_singular_value(khat.reshape(m_h * m_w, s * s * cin, cout))


# --- timing ---------------------------------------------------------------


def _median_s(fn, arg, repeats):
  jax.block_until_ready(fn(arg))   # compile (and a first call)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(arg))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _layer_fns(stage):
  layer, shape = stage.layer, stage.layer_in_shape
  if isinstance(layer, lnn.Conv):
    new = lambda k: norms.conv_global_norm(k, shape[:2], layer.stride, layer.padding)
    old = lambda k: _old_conv_global_norm(k, shape[:2], layer.stride, layer.padding)
    desc = (f"conv {shape[0]}x{shape[1]}x{shape[2]} -> {layer.features}, k{layer.kernel_size} "
            f"s{layer.stride} p{layer.padding}")
  else:
    new = norms.dense_global_norm
    old = lambda k: _old_top_singular_value(k.astype(jnp.float32)[None])
    desc = f"dense {stage.params['kernel'].shape[0]} -> {stage.params['kernel'].shape[1]}"
  return jax.jit(new), jax.jit(old), desc


def bench_model(name, repeats, skip_old):
  model = lipjax.models.get(name, num_classes=NUM_CLASSES[name])
  shape = model.input_shape
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  stages = trace_lib.trace(model, v, shape)
  print(f"\n### {name.upper()} at {'x'.join(map(str, shape))} (random init, "
        f"{repeats} repeats)\n")
  print("| layer | shape | new s | old s | speed-up | rel. diff |")
  print("|---|---|---|---|---|---|")
  tot_new = tot_old = 0.0
  for st in stages:
    new, old, desc = _layer_fns(st)
    k = st.params["kernel"]
    t_new = _median_s(new, k, repeats)
    tot_new += t_new
    if skip_old:
      print(f"| {st.name} | {desc} | {t_new:.2f} | - | - | - |", flush=True)
      continue
    t_old = _median_s(old, k, repeats)
    tot_old += t_old
    a, b = float(new(k)), float(old(k))
    print(f"| {st.name} | {desc} | {t_new:.2f} | {t_old:.2f} | {t_old / t_new:.1f}x | "
          f"{(a - b) / b:+.1e} |", flush=True)
  if skip_old:
    print(f"| total | | {tot_new:.2f} | - | - | |")
  else:
    print(f"| total | | {tot_new:.2f} | {tot_old:.2f} | {tot_old / tot_new:.1f}x | |")
  t = time.perf_counter()
  jax.block_until_ready(lipjax.global_lipschitz_bound(model, v))
  first = time.perf_counter() - t
  warm = _median_s(lambda vv: lipjax.global_lipschitz_bound(model, vv), v, repeats)
  print(f"\n`global_lipschitz_bound` (new): first call {first:.2f} s (with compilation), "
        f"warm {warm:.2f} s")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="8c2f,6c2f,4c3f")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip_old", action="store_true")
  a = p.parse_args()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load:.1f} at start; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}; numpy {np.__version__}; threadpoolctl "
        f"{'present' if norms.threadpoolctl is not None else 'absent'}")
  for name in a.models.split(","):
    bench_model(name.strip().lower(), a.repeats, a.skip_old)


if __name__ == "__main__":
  main()
