"""Executes notebooks/lipjax_colab.ipynb top to bottom on CPU (quick settings).

The pmapped training step runs over the one CPU device here (the same code
path as D GPUs or TPU cores; the D > 1 arithmetic is tested in
tests/test_parallel.py).
"""

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "lipjax_colab.ipynb"


def _text(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o["text"])
      elif "data" in o and "text/plain" in o["data"]:
        out.append(o["data"]["text/plain"])
  return "".join(out)


def test_notebook_is_stored_without_outputs_and_matches_its_generator():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None
  sys.path.insert(0, str(ROOT / "notebooks"))
  try:
    import make_notebook   # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  assert json.loads(nbformat.writes(make_notebook.build())) == json.loads(NOTEBOOK.read_text())


def test_notebook_runs_top_to_bottom(monkeypatch):
  monkeypatch.setenv("LIPJAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  text = _text(nb)
  assert "backend: cpu, devices: " in text
  assert "quick mode: True" in text
  assert "step    20" in text
  assert "clean accuracy" in text and "median local/global ratio" in text
  assert "eps 0.5    certified (local)" in text
  # The ratio plot names the images it shows (quick mode certifies 32), and
  # the accuracy axis starts at 0.
  assert "over the first 32 test images; accuracy axis from 0 to 1.02" in text
