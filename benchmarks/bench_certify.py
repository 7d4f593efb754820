r"""Times ``lipjax.certify`` stage by stage against a forward pass, in one process.

Run::

  python benchmarks/bench_certify.py --workdir=runs/m4cpu_global --n=10000
  python benchmarks/bench_certify.py --model=6c2f --n=2048 --eps=0.1551
  python benchmarks/bench_certify.py --model=4c3f --n=1024 --compare_n=256
  python benchmarks/bench_certify.py --model=liresnet --n=256 --compare_n=128

Certifies ``--n`` images at ``--eps`` with ``bound="global"`` and with the
default sound local certificate (triage), and prints, per call, the seconds
and images/s of each stage with the number of images that reached it:

* ``norms``: the per-layer global norms (host SVDs), once per call;
* ``global``: the global certificate of every image: the screen (a forward
  pass with a norm-based rounding bound) plus ``global_exact``, the exact
  (box) certificate of the images the screen could not rule out;
* ``triage``: the estimates from below (``mode="lower"``) of the images the
  global certificate leaves undecided;
* ``sound``: the sound local bound of the images the triage leaves undecided.

References timed in the same process: one forward pass over the images
(``model.apply`` compiled, chunks of ``--batch``) and one global bound
(``global_lipschitz_bound``). ``--repeat`` runs every call again; the table
shows medians of the warm runs (compiled; nothing cached between calls) and
the first (cold) run separately. The ratios compare medians.

Baselines on the first ``--compare_n`` images: the global certificate
without the screen (``screen=False``) and the sound local bound on every
image (``triage=False``); the certified sets must be identical.

``--no_box_clip`` certifies without the last layer's box-clipped translation
(``box_clip=False``), the certificate of releases before it: that compares
the bound code itself with such a release.

``--workdir`` certifies a trained run's checkpoint (read only; model, data
set, split and image shape from its config.json). Without it ``--model`` is
a randomly initialised zoo model on MNIST test images when its input is
28x28x1, else on uniform random images of its shape labelled with its own
predictions (so that every stage has work).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lipjax  # noqa: E402  pylint: disable=wrong-import-position
from lipjax import data  # noqa: E402  pylint: disable=wrong-import-position

_STAGES = ("norms", "global", "global_exact", "attack", "triage", "triage_lanczos", "sound")


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
  dev = jax.devices()[0]
  return (f"{cores} cores, {cpu}{load}; JAX {jax.__version__}, {jax.device_count()} "
          f"{dev.platform} device(s) ({dev.device_kind})")


def _load(a):
  """Returns ``(model, variables, x, y, description)``."""
  if a.workdir:
    from experiments import train_lib   # pylint: disable=import-outside-toplevel
    from lipjax.training import checkpoints   # pylint: disable=import-outside-toplevel
    cfg = checkpoints.load_config(a.workdir)
    shape = tuple(cfg.get("image_shape") or (28, 28, 1))
    model = train_lib.build_model(cfg, shape)
    variables, step = checkpoints.restore_variables(a.workdir, a.checkpoint)
    split = cfg.get("test_split") or "test"
    ds = data.load(cfg["dataset"], f"{split}[:{a.n}]", data_dir=cfg.get("data_dir") or None)
    what = (f"{cfg['model']} {cfg['dataset']}, {a.checkpoint} checkpoint (step {step}) of "
            f"{a.workdir}, {len(ds)} {split} images")
    return model, variables, jnp.asarray(ds.images), jnp.asarray(ds.labels), what
  model = lipjax.models.get(a.model)
  shape = tuple(model.input_shape)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  if shape == (28, 28, 1):
    ds = data.load("mnist", f"test[:{a.n}]")
    x, y = jnp.asarray(ds.images), jnp.asarray(ds.labels)
    src = f"{len(ds)} MNIST test images"
  else:
    x = jax.random.uniform(jax.random.PRNGKey(1), (a.n,) + shape)
    y = jnp.argmax(jax.jit(model.apply)(variables, x), -1)
    src = f"{a.n} uniform random {shape} images labelled by the model"
  return model, variables, x, y, f"{a.model}, random init, {src}"


def _timed(fn):
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t


def _certify(model, variables, x, y, eps, **kw):
  stats = {}
  cert, sec = _timed(lambda: lipjax.certify(model, variables, x, y, eps, stats=stats, **kw))
  return cert, sec, stats


def _median_warm(values):
  return statistics.median(values[1:]) if len(values) > 1 else values[0]


def _stage_rows(label, runs, n):
  """Rows of one call: total, then each stage (warm median; cold in brackets)."""
  def cell(values):
    warm = _median_warm(values)
    return (f"{warm:.2f}" + (f" ({values[0]:.2f})" if len(values) > 1 else "")), warm
  text, ref = cell([sec for _, sec, _ in runs])
  rows = [f"| {label} | **total** | {n} | {text} | {n / ref:,.0f} |"]
  for stage in _STAGES:
    if stage not in runs[0][2]:
      continue
    count = runs[0][2][stage]["examples"]
    text, ref = cell([st.get(stage, {"seconds": 0.0})["seconds"] for _, _, st in runs])
    rate = f"{count / ref:,.0f}" if ref > 0 and count else ""
    rows.append(f"| | {stage} | {count if stage != 'norms' else ''} | {text} | {rate} |")
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--workdir", default="", help="a training run (read only)")
  p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
  p.add_argument("--model", default="4c3f", help="zoo model when no --workdir")
  p.add_argument("--n", "--num", dest="n", type=int, default=10000)
  p.add_argument("--eps", type=float, default=1.58)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeat", type=int, default=3, help="runs of each call (the first is cold)")
  p.add_argument("--compare_n", type=int, default=512,
                 help="images of the in-process baselines (0: skip)")
  p.add_argument("--skip_local", action="store_true", help="time bound='global' only")
  p.add_argument("--no_box_clip", action="store_true",
                 help="certify without the last layer's box-clipped translation "
                      "(box_clip=False), as releases before it did")
  a = p.parse_args()

  model, variables, x, y, what = _load(a)
  n = int(x.shape[0])
  opts = dict(box_clip=False) if a.no_box_clip else {}
  print(f"# bench_certify: {what}; eps {a.eps}; batch {a.batch}"
        f"{'; box_clip=False' if a.no_box_clip else ''}", flush=True)
  print(f"# machine: {_machine()}", flush=True)

  fwd = jax.jit(model.apply)

  def forward():
    return [fwd(variables, x[i:i + a.batch]) for i in range(0, n, a.batch)]

  def bound():
    return lipjax.global_lipschitz_bound(model, variables)

  _timed(forward)
  _timed(bound)
  ref_fwd, ref_gb = [], []
  glob_runs, loc_runs = [], []
  def log(what, secs, stats=None):   # progress lines, kept if the run is cut short
    st = "" if stats is None else " " + ", ".join(
        f"{k} {v['seconds']:.2f} s/{v['examples']}" for k, v in stats.items())
    print(f"# {what}: {secs:.2f} s{st}", flush=True)

  for i in range(a.repeat):   # interleaved, so that load changes hit every call alike
    ref_fwd.append(_timed(forward)[1])
    ref_gb.append(_timed(bound)[1])
    log(f"run {i} forward, global bound", ref_fwd[-1] + ref_gb[-1])
    glob_runs.append(_certify(model, variables, x, y, a.eps, bound="global",
                              batch_size=a.batch, **opts))
    log(f"run {i} global", *glob_runs[-1][1:])
    if not a.skip_local:
      loc_runs.append(_certify(model, variables, x, y, a.eps, batch_size=a.batch, **opts))
      log(f"run {i} local", *loc_runs[-1][1:])
  sec_fwd, sec_gb = statistics.median(ref_fwd), statistics.median(ref_gb)

  print("\n| call | stage | images | seconds, warm median (cold) | images/s |")
  print("|---|---|---|---|---|")
  print(f"| forward pass | | {n} | {sec_fwd:.2f} | {n / sec_fwd:,.0f} |")
  print(f"| one global bound | | | {sec_gb:.2f} | |")
  for r in _stage_rows('certify(bound="global")', glob_runs, n):
    print(r)
  if loc_runs:
    for r in _stage_rows("certify() (local, triage)", loc_runs, n):
      print(r)
  glob = glob_runs[0][0]
  warm_glob = _median_warm([s for _, s, _ in glob_runs])
  print(f"\nglobal certificate: {warm_glob:.2f} s = {warm_glob / (sec_fwd + sec_gb):.2f} x "
        f"(forward pass + one global bound = {sec_fwd + sec_gb:.2f} s) = "
        f"{warm_glob / sec_fwd:.1f} forward passes; certified "
        f"{100 * float(jnp.mean(glob.certified)):.2f}%, clean "
        f"{100 * float(jnp.mean(glob.predicted == y)):.2f}%")
  if loc_runs:
    loc = loc_runs[0][0]
    warm_loc = _median_warm([s for _, s, _ in loc_runs])
    print(f"local certificate: {warm_loc:.2f} s = {warm_loc / sec_fwd:.1f} forward passes; "
          f"certified {100 * float(jnp.mean(loc.certified)):.2f}%; "
          f"{int(jnp.sum(loc.local))} images reached the sound local bound")

  m = min(a.compare_n, n)
  if m:
    print(f"\nbaselines on the first {m} images (same process, warm):")
    xs, ys = x[:m], y[:m]
    runs = {}
    for name, kw in (("global, screen=False", dict(bound="global", screen=False)),
                     ("global (screen)", dict(bound="global")),
                     ("local, triage=False", dict(triage=False)),
                     ("local, triage", {})):
      if a.skip_local and "local" in name:
        continue
      kw = dict(kw, **opts)
      _certify(model, variables, xs, ys, a.eps, batch_size=a.batch, **kw)   # compile
      runs[name] = _certify(model, variables, xs, ys, a.eps, batch_size=a.batch, **kw)
      log(name, *runs[name][1:])
    for ref, new in (("global, screen=False", "global (screen)"),
                     ("local, triage=False", "local, triage")):
      if ref not in runs:
        continue
      (c0, s0, _), (c1, s1, _) = runs[ref], runs[new]
      same = bool(np.array_equal(np.asarray(c0.certified), np.asarray(c1.certified)))
      print(f"| {ref} | {s0:.2f} s | {new} | {s1:.2f} s | speed-up {s0 / s1:.1f}x | "
            f"same certified set: {same} |")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
  print(f"\npeak resident memory: {rss:.2f} GiB", flush=True)


if __name__ == "__main__":
  main()
