r"""FLOPs of one training step of each Table 1 setting (XLA's cost analysis).

Run::

  python benchmarks/step_flops.py [NAME_PART ...]

Compiles (does not run) the certified training step of each setting at batch
256 and prints XLA's count of floating-point operations and bytes accessed.
The "Expected wall time" table of docs/guides/reproducing.md scales measured
step times by these counts for the settings whose step was not timed. Only the given settings
(substrings of their names) are compiled when names are passed.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import optax

import lipjax
from lipjax import training

# (name, model, input shape, classes, step options, activation)
SETTINGS = (
    ("mnist 4c3f global", "4c3f", (28, 28, 1), 10, dict(loss="gloro", bound="global")),
    ("mnist 4c3f local 5", "4c3f", (28, 28, 1), 10,
     dict(loss="gloro", bound="local", iterations=5)),
    ("mnist 4c3f local 5 bcp", "4c3f", (28, 28, 1), 10,
     dict(loss="bcp", bound="local", iterations=5)),
    ("cifar10 4c3f global", "4c3f", (32, 32, 3), 10, dict(loss="bcp", bound="global")),
    ("cifar10 4c3f local 2", "4c3f", (32, 32, 3), 10,
     dict(loss="bcp", bound="local", iterations=2)),
    ("cifar10 6c2f global", "6c2f", (32, 32, 3), 10, dict(loss="bcp", bound="global")),
    ("cifar10 6c2f local 2", "6c2f", (32, 32, 3), 10,
     dict(loss="bcp", bound="local", iterations=2)),
    ("cifar10 6c2f maxmin local 2", "6c2f", (32, 32, 3), 10,
     dict(loss="bcp", bound="local", iterations=2), "clipped_maxmin"),
    ("tinyimagenet 8c2f local 1", "8c2f", (64, 64, 3), 200,
     dict(loss="bcp", bound="local", iterations=1, sparsity_weight=0.01)),
    ("tinyimagenet 8c2f global", "8c2f", (64, 64, 3), 200, dict(loss="bcp", bound="global")),
)


def step_cost(model_name, shape, num_classes, options, activation="clipped_relu", batch=256):
  """``{"gflop", "bytes_gb"}`` of the compiled training step."""
  model = lipjax.models.get(model_name, num_classes=num_classes, activation=activation,
                            input_shape=shape)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  opt = optax.chain(optax.adam(1e-3), training.project_thresholds())
  step = training.make_train_step(model, opt, eps_schedule=0.1, kappa_schedule=0.5, **options)
  power = training.init_power_state(model, variables, shape, jax.random.PRNGKey(2))
  state = training.create_train_state(variables["params"], opt, rng=0, power=power)
  x = jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  fn = step if hasattr(step, "lower") else jax.jit(step)
  cost = fn.lower(state, x, y).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return {"gflop": cost.get("flops", float("nan")) / 1e9,
          "bytes_gb": cost.get("bytes accessed", float("nan")) / 1e9}


def main(argv):
  for setting in SETTINGS:
    name, model_name, shape, num_classes, options = setting[:5]
    if argv and not any(part in name for part in argv):
      continue
    t0 = time.time()
    cost = step_cost(model_name, shape, num_classes, options, *setting[5:])
    print(json.dumps({"setting": name, **{k: round(v, 2) for k, v in cost.items()},
                      "compile_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
