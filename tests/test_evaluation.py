"""Evaluation: PGD against closed-form attacks, Jacobian-norm lower bounds, the
multi-eps report of a briefly trained model, the certify command and its errors."""

import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lipjax
from lipjax import data, training
from lipjax import nn as lnn
from lipjax.evaluation import (EvalOptions, evaluate, jacobian_norm_lower_bound, pgd_attack,
                               perturbation_norm, plots, power_norm, report)
from lipjax.training import checkpoints

from experiments import certify as certify_cli
from experiments import compare as compare_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mostly running compiled code (training, PGD on a conv net), which is several
# times slower at the suite's XLA level 0: these run at the default level, in
# tests/test_default_xla.py's subprocess.
pytestmark = pytest.mark.default_xla


# ---------------------------------------------------------------------------
# PGD on linear classifiers: the minimal l2 perturbation is known exactly.
# ---------------------------------------------------------------------------


def _linear_apply(variables, x):
  return x.reshape(x.shape[0], -1) @ variables["w"] + variables["b"]


def _linear_problem(seed=0, d=20, c=4, b=8):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d, c)).astype(np.float32)
  bias = rng.normal(size=(c,)).astype(np.float32) * 0.1
  x = (0.5 + 0.02 * rng.normal(size=(b, d))).astype(np.float32)   # far from 0 and 1
  z = x @ w + bias
  y = np.argmax(z, axis=1).astype(np.int32)
  # Distance to the decision boundary against class i: (z_y - z_i) / ||w_y - w_i||.
  dist = np.full(b, np.inf)
  for i in range(c):
    gap = z[np.arange(b), y] - z[:, i]
    nrm = np.linalg.norm(w[:, y].T - w[:, i][None, :], axis=1)
    dist = np.where(i != y, np.minimum(dist, gap / np.maximum(nrm, 1e-12)), dist)
  return {"w": jnp.asarray(w), "b": jnp.asarray(bias)}, x, y, dist


def test_pgd_finds_known_adversarial_and_stays_in_ball_and_box():
  v, x, y, dist = _linear_problem()
  assert np.all(dist < 0.4)   # every point is flippable well inside [0, 1]
  eps = dist * 1.05
  res = pgd_attack(_linear_apply, v, x, y, eps, steps=50, restarts=2)
  assert np.all(np.asarray(res.success))
  xa = np.asarray(res.x_adv)
  assert np.all(perturbation_norm(x, xa) <= eps * (1 + 1e-5))
  assert xa.min() >= 0.0 and xa.max() <= 1.0
  pred = np.argmax(np.asarray(_linear_apply(v, jnp.asarray(xa))), axis=1)
  assert np.all(pred != y)


def test_pgd_cannot_succeed_below_the_minimal_perturbation():
  v, x, y, dist = _linear_problem(seed=1)
  res = pgd_attack(_linear_apply, v, x, y, dist * 0.95, steps=50, restarts=2, loss="ce")
  assert not np.any(np.asarray(res.success))
  assert np.all(np.asarray(res.margin) > 0)


def test_pgd_respects_the_box_when_the_ball_leaves_it():
  v, x, y, _ = _linear_problem(seed=2)
  x = np.clip(x + 0.45 * np.sign(np.random.default_rng(0).normal(size=x.shape)), 0, 1)
  x = x.astype(np.float32)
  eps = 3.0
  res = pgd_attack(_linear_apply, v, x, y, eps, steps=20)
  xa = np.asarray(res.x_adv)
  assert xa.min() >= 0.0 and xa.max() <= 1.0
  assert np.all(perturbation_norm(x, xa) <= eps * (1 + 1e-5))


def test_pgd_example_keys_make_each_attack_independent_of_its_batch():
  v, x, y, dist = _linear_problem(seed=3, b=8)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(jnp.arange(8))
  eps = dist * 1.02
  full = pgd_attack(_linear_apply, v, x, y, eps, steps=3, example_keys=keys)
  perm = np.array([5, 2, 7, 0])
  part = pgd_attack(_linear_apply, v, x[perm], y[perm], eps[perm], steps=3,
                    example_keys=keys[perm])
  np.testing.assert_allclose(np.asarray(part.x_adv), np.asarray(full.x_adv)[perm], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(part.success), np.asarray(full.success)[perm])
  with pytest.raises(ValueError, match="example_keys"):
    pgd_attack(_linear_apply, v, x, y, eps, example_keys=keys[:3])


def test_pgd_rejects_bad_arguments():
  v, x, y, _ = _linear_problem()
  with pytest.raises(ValueError, match="eps"):
    pgd_attack(_linear_apply, v, x, y, -0.1)
  with pytest.raises(ValueError, match="loss"):
    pgd_attack(_linear_apply, v, x, y, 0.1, loss="hinge")


# ---------------------------------------------------------------------------
# Jacobian norms
# ---------------------------------------------------------------------------


def test_power_norm_of_a_linear_network_approaches_its_spectral_norm_from_below():
  model = lnn.Sequential((lnn.Flatten(), lnn.Dense(7)), input_shape=(4, 5, 1))
  v = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 4, 5, 1)))
  w = np.asarray(v["params"]["layers_1"]["kernel"], np.float64)
  sigma = np.linalg.svd(w, compute_uv=False)[0]
  x = jnp.full((3, 4, 5, 1), 0.5)
  f = lambda xa: model.apply(v, xa)
  est, _ = power_norm(f, x, jax.random.normal(jax.random.PRNGKey(0), x.shape), 60)
  assert np.all(np.asarray(est) <= sigma * (1 + 1e-5))
  np.testing.assert_allclose(np.asarray(est), sigma, rtol=1e-3)
  js = jacobian_norm_lower_bound(model, v, x, 0.3, steps=3)
  assert np.all(np.asarray(js.lower_bound) <= sigma * (1 + 1e-5))
  assert np.all(np.asarray(js.lower_bound) >= 0.5 * sigma)


# ---------------------------------------------------------------------------
# A briefly trained 2C2F model in a workdir with the checkpoint layout.
# ---------------------------------------------------------------------------

EPS = (0.05, 0.15, 0.3)


def _train(model, images, labels, steps=30, batch=64, eps_train=0.3):
  """A few GloRo steps with the library's training step (one compile: the
  running power vectors are in the state from the start)."""
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]))
  opt = optax.chain(optax.adam(3e-3), training.project_thresholds())
  step = training.make_train_step(
      model, opt, loss="gloro", bound="global", kappa_schedule=0.0,
      eps_schedule=lambda s: eps_train * jnp.minimum(1.0, (s + 1) / (steps / 2)))
  state = training.create_train_state(
      variables["params"], opt, rng=0,
      power=training.init_power_state(model, variables, images.shape[1:]))
  for i in range(steps):
    sl = slice((i * batch) % len(images), (i * batch) % len(images) + batch)
    state, metrics = step(state, jnp.asarray(images[sl]), jnp.asarray(labels[sl]))
  return state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("run")
  config = {"model": "2c2f", "activation": "clipped_relu", "num_classes": 10,
            "dataset": "mnist", "eps_train": 0.3, "eps_test": 0.3, "loss": "gloro",
            "bound": "global", "batch_size": 64, "seed": 0, "test_split": "test"}
  checkpoints.save_config(wd, config)
  model = lipjax.models.get("2c2f", num_classes=10, activation="clipped_relu")
  ds = data.load("mnist", "train[:1920]")
  state, metrics = _train(model, ds.images, ds.labels)
  for s in (10, 20, 30):
    checkpoints.append_metrics(wd, {"step": s, "epoch": 0, "split": "train",
                                    "loss": float(metrics["loss"]) + 30 - s,
                                    "accuracy": float(metrics["accuracy"])})
  checkpoints.append_metrics(wd, {"step": 30, "epoch": 1, "split": "val",
                                  "val_certified_accuracy": 0.1})
  with checkpoints.TrainCheckpointer(wd) as ck:
    ck.save(state, epoch=1, batch_index=0, metrics={"val_certified_accuracy": 0.1})
  return str(wd)


def _flags(workdir, tmp, **over):
  f = dict(workdir=workdir, checkpoint="best", split=None, num_examples=48,
           eps=",".join(str(e) for e in EPS), pgd_steps=8, pgd_restarts=1,
           pgd_step_size=None, pgd_loss="margin", pgd_examples=0, pgd_skip_certified=False,
           cross_check_examples=0, batch_size=48,
           bounds=["local", "global"], cross_check=True, tightness_examples=16,
           tightness_steps=4, failure_probability=1e-9, lanczos_steps=30, output_dir=str(tmp),
           data_dir=None, seed=0, progress=False)
  f.update(over)
  return types.SimpleNamespace(**f)


@pytest.fixture(scope="module")
def evaluated(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval")
  code = certify_cli.run(_flags(workdir, out))
  with open(out / "report.json") as f:
    results = json.load(f)
  with open(out / "report.md") as f:
    md = f.read()
  return code, results, md, out


def test_report_numbers_are_consistent(evaluated):
  code, res, _, _ = evaluated
  assert code == 0
  s = res["summary"]
  assert res["eps"] == list(EPS)
  assert s["num_examples"] == 48
  for b in ("local", "global"):
    acc = s["certified"][b]["accuracy"]
    assert all(a >= c for a, c in zip(acc, acc[1:])), acc        # non-increasing in eps
    direct = s["certified"][b]["accuracy_direct"]
    assert all(a >= c for a, c in zip(direct, direct[1:])), direct
    for k in range(len(EPS)):
      assert s["pgd"]["accuracy"][k] >= acc[k]                     # PGD >= certified
      assert s["clean_accuracy"] >= s["pgd"]["accuracy"][k]
  assert s["clean_accuracy"] > 0.5            # it did learn something
  assert s["certified"]["global"]["accuracy"][0] > 0   # and certifies something
  assert res["violations"] == [] and s["violations"] == 0
  per = res["per_example"]
  for b in ("local", "global"):
    for k, e in enumerate(EPS):
      cert = np.asarray(per[f"certified_{b}"][f"{e:g}"])
      pgd_ok = ~np.asarray(per["pgd_success"][f"{e:g}"])
      assert np.all(pgd_ok[cert])
      assert np.all(np.asarray(per["predicted"])[cert] == np.asarray(per["label"])[cert])
      # Certified radius >= eps exactly where certified at eps (global: from radii).
      r = np.asarray(per[f"radius_{b}"])
      assert np.all(r[cert] >= e * (1 - 1e-6))
  # Tightness: empirical lower bound <= local bound <= global bound.
  t = np.asarray(per["tightness_local_over_empirical"])
  assert np.all(t >= 1 - 1e-4)
  assert np.all(np.asarray(per["tightness_local_over_global"]) <= 1 + 1e-4)
  # Guarantees: 2C2F has convolutions, so the local bound is probabilistic.
  g = s["guarantee"]
  assert not g["local"]["deterministic"]
  assert 0 < g["local"]["failure_probability_per_example"] <= 1e-9 * 1.01
  assert g["global"]["deterministic"] and g["global"]["failure_probability_per_example"] == 0


def test_markdown_agrees_with_json(evaluated):
  _, res, md, _ = evaluated
  s = res["summary"]
  rows = re.findall(r"^\| model.*?eps = ([0-9.e-]+) \| (.+) \|$|^\| (.+?), eps = ([0-9.e-]+) "
                    r"\| (.+) \|$", md, flags=re.M)
  assert len(rows) == len(EPS)
  for k, row in enumerate(rows):
    eps_txt, cells = row[3], row[4]
    assert float(eps_txt) == pytest.approx(EPS[k])
    for b, cell in zip(res["bounds"], cells.split(" | ")):
      clean, pgd_acc, cert = (float(v) for v in cell.split(" / "))
      assert clean == round(100 * s["clean_accuracy"], 1)
      assert pgd_acc == round(100 * s["pgd"]["accuracy"][k], 1)
      assert cert == round(100 * s["certified"][b]["accuracy"][k], 1)
  assert "probabilistic" in md and "deterministic" in md
  assert "1.0e-09" in md


def test_plots_written(evaluated):
  _, _, _, out = evaluated
  for name in ("certified_vs_eps.png", "local_over_global_hist.png", "training_curves.png"):
    path = out / name
    assert path.exists() and path.stat().st_size > 1000
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_global_columns_are_the_direct_certificates_at_each_eps(workdir):
  model = lipjax.models.get("2c2f", num_classes=10, activation="clipped_relu")
  variables, _ = checkpoints.restore_variables(workdir)
  ds = data.load("mnist", "test[:48]")
  res = evaluate(model, variables, ds.images, ds.labels, EPS,
                 EvalOptions(bounds=("global",), pgd_steps=0, tightness_examples=0,
                             progress=False))
  for e in EPS:
    direct = lipjax.certify(model, variables, ds.images, ds.labels, e, bound="global")
    column = np.asarray(res["per_example"]["certified_global"][f"{e:g}"])
    assert np.array_equal(column, np.asarray(direct.certified))


def test_pgd_on_the_first_examples_only(workdir):
  model = lipjax.models.get("2c2f", num_classes=10, activation="clipped_relu")
  variables, _ = checkpoints.restore_variables(workdir)
  ds = data.load("mnist", "test[:48]")
  opts = dict(bounds=("global",), pgd_steps=4, batch_size=16, tightness_examples=0,
              progress=False)
  full = evaluate(model, variables, ds.images, ds.labels, EPS, EvalOptions(**opts))
  part = evaluate(model, variables, ds.images, ds.labels, EPS,
                  EvalOptions(pgd_examples=16, **opts))
  assert part["summary"]["pgd"]["examples"] == 16
  assert full["summary"]["pgd"]["examples"] == 48
  correct = np.asarray(full["per_example"]["predicted"]) == ds.labels
  for k, e in enumerate(EPS):
    succ_full = np.asarray(full["per_example"]["pgd_success"][f"{e:g}"])
    succ_part = np.asarray(part["per_example"]["pgd_success"][f"{e:g}"])
    np.testing.assert_array_equal(succ_part[:16], succ_full[:16])   # same attacks
    assert not succ_part[16:].any()                                   # not attacked
    expected = np.mean(correct[:16] & ~succ_full[:16])
    assert part["summary"]["pgd"]["accuracy"][k] == pytest.approx(expected)
  # Clean and certified accuracy still cover every example.
  assert part["summary"]["clean_accuracy"] == full["summary"]["clean_accuracy"]
  assert part["summary"]["certified"] == full["summary"]["certified"]
  assert part["summary"]["pgd"]["clean_accuracy"] == pytest.approx(np.mean(correct[:16]))
  assert (f"48 examples; PGD on the first 16 examples (clean accuracy on them "
          f"{100 * np.mean(correct[:16]):.1f}%)") in report.to_markdown(part, title="t")
  assert "48 examples; PGD: " in report.to_markdown(full, title="t")


def test_pgd_skipping_certified_points_keeps_the_accuracy(workdir):
  model = lipjax.models.get("2c2f", num_classes=10, activation="clipped_relu")
  variables, _ = checkpoints.restore_variables(workdir)
  ds = data.load("mnist", "test[:48]")
  opts = dict(bounds=("global",), pgd_steps=4, pgd_restarts=2, batch_size=16,
              tightness_examples=0, progress=False)
  full = evaluate(model, variables, ds.images, ds.labels, EPS, EvalOptions(**opts))
  skip = evaluate(model, variables, ds.images, ds.labels, EPS,
                  EvalOptions(pgd_skip_certified=True, cross_check=True,
                              cross_check_examples=32, **opts))
  p_full, p_skip = full["summary"]["pgd"], skip["summary"]["pgd"]
  correct = np.asarray(full["per_example"]["predicted"]) == ds.labels
  for k, e in enumerate(EPS):
    cert = np.asarray(full["per_example"]["certified_global"][f"{e:g}"])
    assert p_full["attacked"][k] == int(correct.sum())           # misclassified: skipped
    assert p_skip["attacked"][k] == int((correct & ~cert).sum())
    assert p_skip["cross_check_attacked"][k] == int(cert[:32].sum())
    # Uncertified points get the very same attacks (per-example keys), and
    # certified points are not broken, so the accuracy is the same.
    assert p_skip["accuracy"][k] == pytest.approx(p_full["accuracy"][k])
    succ_full = np.asarray(full["per_example"]["pgd_success"][f"{e:g}"])
    succ_skip = np.asarray(skip["per_example"]["pgd_success"][f"{e:g}"])
    np.testing.assert_array_equal(succ_skip[~cert], succ_full[~cert])
    assert not succ_full[cert].any()
  assert skip["violations"] == []
  md = report.to_markdown(skip, title="t")
  assert "PGD attacked only the correctly classified points" in md
  assert "among the first 32 examples" in md


# ---------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, no traceback.
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_errors(workdir, tmp_path):
  err = certify_cli.InputError
  with pytest.raises(err, match="does not exist"):
    certify_cli.run(_flags(str(tmp_path / "nope"), tmp_path))
  with pytest.raises(err, match="empty"):
    certify_cli.run(_flags(workdir, tmp_path, eps=""))
  with pytest.raises(err, match="> 0"):
    certify_cli.run(_flags(workdir, tmp_path, eps="0.1,-0.5"))
  with pytest.raises(err, match="step"):
    certify_cli.run(_flags(workdir, tmp_path, checkpoint="soon"))
  with pytest.raises(err, match="--cross_check_examples must be >= 0"):
    certify_cli.run(_flags(workdir, tmp_path, cross_check_examples=-1))
  empty = tmp_path / "empty"
  empty.mkdir()
  checkpoints.save_config(empty, {"model": "2c2f", "activation": "clipped_relu",
                                  "num_classes": 10, "dataset": "mnist", "eps_test": 0.3})
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoints"):
    certify_cli.run(_flags(str(empty), tmp_path))
  with pytest.raises(checkpoints.CheckpointError, match="step 999"):
    certify_cli.run(_flags(workdir, tmp_path, checkpoint="999"))
  # A config that names another model than the checkpoint holds.
  other = tmp_path / "other"
  other.mkdir()
  cfg = checkpoints.load_config(workdir)
  cfg["model"] = "4c3f"
  checkpoints.save_config(other, cfg)
  os.symlink(os.path.join(workdir, "checkpoints"), other / "checkpoints")
  with pytest.raises(err, match="does not match the config's model"):
    certify_cli.run(_flags(str(other), tmp_path))
  # A --data_dir that does not exist or lacks the data: no fallback to the
  # installed MNIST.
  nodata = tmp_path / "nodata"
  with pytest.raises(err, match="--data_dir .* does not exist"):
    certify_cli.run(_flags(workdir, tmp_path, data_dir=str(nodata)))
  nodata.mkdir()
  with pytest.raises(data.DataError, match="holds no usable mnist 'test' data"):
    certify_cli.run(_flags(workdir, tmp_path, data_dir=str(nodata)))


@pytest.mark.parametrize("args,expected", [
    (["--workdir={tmp}/missing"], "workdir '{tmp}/missing' does not exist"),
    (["--workdir={tmp}", "--data_dir={tmp}/nodata"], "--data_dir '{tmp}/nodata' does not exist"),
    (["--workdir={tmp}", "--num_examples=many"], "--num_examples=many")])
def test_command_line_error_is_one_line_without_traceback(tmp_path, args, expected):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.certify"] + [a.format(tmp=tmp_path) for a in args],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  lines = [l for l in (proc.stdout + proc.stderr).strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("certify: error: "), proc.stderr
  assert expected.format(tmp=tmp_path) in lines[0]
  assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------
# Reports and figures a reader can trust at a glance.
# ---------------------------------------------------------------------------


def test_radius_table_compares_like_with_like(evaluated):
  _, res, md, _ = evaluated
  s, per, top = res["summary"], res["per_example"], max(EPS)
  rl = np.asarray(per["radius_local"])
  rg = np.asarray(per["radius_global"])
  for b, r in (("local", rl), ("global", rg)):
    assert s["radius"][b]["cap"] == top           # one cap for both bounds
    assert np.all(r <= top * (1 + 1e-6))
    assert s["radius"][b]["mean"] == pytest.approx(float(np.mean(r)), rel=1e-5)
  # The local bound is never above the global one, and triaged examples enter
  # with the global certificate's radius: no example's local radius is below
  # its global radius (up to the certificates' float32 slack).
  assert np.all(rl >= rg * (1 - 1e-3) - 1e-6), np.max(rg - rl)
  assert s["radius"]["local"]["mean"] >= s["radius"]["global"]["mean"] * (1 - 1e-3)
  fractions = s["certified"]["local"]["local_bound_fraction"]
  for k, e in enumerate(EPS):
    computed = np.asarray(per["local_bound_computed"][f"{e:g}"])
    assert fractions[k] == pytest.approx(float(np.mean(computed)))
  assert f"both bounds capped at the largest eps, {top:g}" in md
  assert "triage" in md and "reached the sound local bound" in md


def test_certified_plot_stops_at_the_evaluated_radii_and_marks_them(evaluated):
  _, res, _, _ = evaluated
  s = res["summary"]
  fig = plots.certified_figure(res, "mnist 2c2f (clipped_relu), checkpoint step 30")
  ax = fig.axes[0]
  assert ax.get_title() == "mnist 2c2f (clipped_relu), checkpoint step 30: 48 examples"
  lines = {line.get_label(): line for line in ax.lines}
  for label in ("certified (global) at eps", "certified (local) at eps", "PGD at eps"):
    np.testing.assert_allclose(lines[label].get_xdata(), EPS)
    assert lines[label].get_marker() not in (None, "", "None")
  np.testing.assert_allclose(lines["certified (local) at eps"].get_ydata(),
                             100 * np.asarray(s["certified"]["local"]["accuracy"]))
  curve = lines["certified (global), from radii"]
  x, y = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
  assert x.max() == pytest.approx(max(EPS)) and ax.get_xlim()[1] <= 1.05 * max(EPS)
  # No drop at the cap: the line ends at the certificate evaluated there.
  assert y[-1] == pytest.approx(100 * s["certified"]["global"]["accuracy"][-1])
  assert np.all(np.diff(y[:-1]) <= 1e-9)
  import matplotlib.pyplot as plt   # pylint: disable=import-outside-toplevel
  plt.close(fig)


def test_training_curves_show_only_meaningful_series():
  rows = []
  for step in range(10, 101, 10):
    rows.append({"step": step, "epoch": step // 40, "split": "train", "loss": 3.0 - step / 50,
                 "accuracy": 0.5 + step / 400, "vra_estimate": step / 400,
                 "eps": min(1.0, step / 50), "kappa": max(0.0, 1 - step / 50), "lr": 1e-3})
    if step % 40 == 0 or step == 100:
      rows.append({"step": step, "epoch": step // 40, "split": "val", "eps": 0.5,
                   "bound": "global", "val_clean_accuracy": 0.6 + step / 500,
                   "val_certified_accuracy": 0.3 + step / 500})
  rows.append({"step": 100, "epoch": 3, "split": "test", "eps": 0.5, "bound": "local",
               "checkpoint_step": 80, "test_clean_accuracy": 0.8, "test_certified_accuracy": 0.45,
               "test_max_failure_probability": 1e-9})
  fig = plots.training_figure(rows, "mnist 2c2f")
  titles = [ax.get_title() for ax in fig.axes]
  labels = [line.get_label() for ax in fig.axes for line in ax.lines]
  assert titles == ["training loss", "accuracy", "schedules"]
  assert not any(w in text for text in titles + labels
                 for w in ("lr", "learning rate", "checkpoint_step", "failure", "kappa"))
  acc = fig.axes[1]
  assert acc.get_ylim() == (0.0, 1.0)    # single test points do not rescale the axis
  acc_lines = {line.get_label(): line for line in acc.lines}
  for label in ("train accuracy (batches)", "val clean"):
    assert label in acc_lines
  assert "val certified (eps 0.5, global bound)" in acc_lines
  test_lines = [line for label, line in acc_lines.items() if label.startswith("test ")]
  assert len(test_lines) == 2
  for line in test_lines:   # one marker each, at the checkpoint that was certified
    assert list(line.get_xdata()) == [80] and "(step 80" in line.get_label()
  import matplotlib.pyplot as plt   # pylint: disable=import-outside-toplevel
  plt.close(fig)
  # A changing learning rate is shown, on a log axis beside eps.
  for r in rows:
    if r["split"] == "train":
      r["lr"] = 1e-3 * 0.9 ** r["step"]
  fig = plots.training_figure(rows)
  lr_axes = [ax for ax in fig.axes if any(l.get_label() == "learning rate" for l in ax.lines)]
  assert len(lr_axes) == 1 and lr_axes[0].get_yscale() == "log"
  plt.close(fig)


def test_compare_table_and_plot_from_reports(evaluated, tmp_path):
  _, results, _, out = evaluated
  runs = [("a", compare_cli.load_report("unused", str(out))),
          ("b", compare_cli.load_report("unused", str(out)))]
  text = compare_cli.table(runs)
  rows = [l for l in text.splitlines() if l.startswith("| a |")]
  assert len(rows) == len(results["eps"])
  s = results["summary"]
  for k, e in enumerate(sorted(float(x) for x in results["eps"])):
    cells = [c.strip() for c in rows[k].strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(e)
    assert cells[2] == f"{100 * s['clean_accuracy']:.1f}"
    assert cells[4] == f"{100 * s['certified']['local']['accuracy'][k]:.1f}"
    assert cells[5] == f"{100 * s['certified']['global']['accuracy'][k]:.1f}"
    assert cells[6] == f"{s['tightness']['local_over_global']['q50']:.3f}"
  png = compare_cli.plot(runs, str(tmp_path / "c.png"), "t")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_arms_table_gives_each_arms_mean_and_range():
  def rep(clean, local, glob):
    return {"eps": [0.5, 1.0], "summary": {"clean_accuracy": clean, "certified": {
        "local": {"accuracy": local}, "global": {"accuracy": glob}}}}
  runs = [("local/s1", rep(0.90, [0.70, 0.30], [0.60, 0.20])),
          ("local/s2", rep(0.80, [0.60, 0.20], [0.50, 0.10])),
          ("global/s1", rep(0.85, [0.65, 0.25], [0.55, 0.15]))]
  rows = [[c.strip() for c in l.strip("|").split("|")]
          for l in compare_cli.arms_table(runs).splitlines()[2:]]
  assert rows[0] == ["local", "2", "0.5", "85.00 (80.00-90.00)", "65.00 (60.00-70.00)",
                     "55.00 (50.00-60.00)"]
  assert rows[1] == ["local", "2", "1", "85.00 (80.00-90.00)", "25.00 (20.00-30.00)",
                     "15.00 (10.00-20.00)"]
  assert rows[2] == ["global", "1", "0.5", "85.00", "65.00", "55.00"]
  assert len(rows) == 4


def test_compare_bad_input_is_one_line(tmp_path):
  with pytest.raises(compare_cli.InputError, match="not LABEL=WORKDIR"):
    compare_cli.parse_runs(["nolabel"])
  with pytest.raises(compare_cli.InputError, match="unique"):
    compare_cli.parse_runs(["a=x", "a=y"])
  with pytest.raises(compare_cli.InputError, match="experiments.certify"):
    compare_cli.load_report(str(tmp_path))
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "report.json").write_text("{not json")
  with pytest.raises(compare_cli.InputError, match="not a report"):
    compare_cli.load_report(str(tmp_path))
