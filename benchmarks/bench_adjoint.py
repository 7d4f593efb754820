r"""Adjoint of a strided convolution: plain transpose vs the polyphase form's.

Run::

  python benchmarks/bench_adjoint.py --batch=256

For the strided convolutions of 4C3F (MNIST shapes), times the forward map
and ``jax.linear_transpose`` of ``Conv.linear`` (the strided convolution) and
of ``Conv.linear_for_adjoint`` (the same map as a stride-1 convolution of its
polyphase components), jitted, median of ``--repeats`` calls. Prints a table
with the speed-up of the polyphase transpose over the plain one, measured in
the same process, and the largest difference between the two adjoints.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from lipjax import nn as lnn

# (input side, channels in, channels out, kernel, stride, padding): 4C3F's conv2, conv4.
LAYERS = (("conv2", 28, 32, 32, 4, 2, 1), ("conv4", 14, 64, 64, 4, 2, 1))


def _median_ms(fn, arg, repeats):
  jax.block_until_ready(fn(arg))   # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(arg))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeats", type=int, default=9)
  a = p.parse_args()
  print(f"batch {a.batch}; {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}")
  print("\n| layer | forward ms | plain transpose ms | polyphase transpose ms | speed-up | "
        "max abs difference |")
  print("|---|---|---|---|---|---|")
  for name, side, cin, cout, k, s, pad in LAYERS:
    layer = lnn.Conv(features=cout, kernel_size=k, stride=s, padding=pad)
    x = jax.random.uniform(jax.random.PRNGKey(0), (a.batch, side, side, cin))
    params = layer.init(jax.random.PRNGKey(1), x[:1])["params"]
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    fwd = jax.jit(lambda u: layer.linear(params, u))
    v = fwd(x)
    plain_t = jax.linear_transpose(lambda u: layer.linear(params, u), spec)
    poly_t = jax.linear_transpose(lambda u: layer.linear_for_adjoint(params, u), spec)
    plain = jax.jit(lambda w: plain_t(w)[0])
    poly = jax.jit(lambda w: poly_t(w)[0])
    t_fwd = _median_ms(fwd, x, a.repeats)
    t_plain = _median_ms(plain, v, a.repeats)
    t_poly = _median_ms(poly, v, a.repeats)
    diff = float(np.max(np.abs(np.asarray(plain(v)) - np.asarray(poly(v)))))
    print(f"| {name} | {t_fwd:.1f} | {t_plain:.1f} | {t_poly:.1f} | {t_plain / t_poly:.2f}x | "
          f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
