"""Runs the code of the documentation pages, so the docs cannot drift from the code.

Every fenced ``python`` block of ``docs/index.md``, ``docs/getting_started.md``
and of each page in ``docs/guides/`` runs, in the order of the page, in one fresh Python
process per page (the blocks of a page share one namespace, as a reader
typing them in order would). A block that raises fails the page's test, which
names the block's line.

Shell blocks (``bash``, ``console``, ``text``) are never run: they show
commands that train for hours or need a data set.

A python block that only illustrates (a fragment that cannot run on its own)
is marked by the line ``<!-- docs-test: skip -->`` (an HTML comment, invisible
in the site and on GitHub) directly above its opening fence. Such blocks must
be listed in ``ILLUSTRATIVE`` below, so that adding one is a visible change of
this test, and every run reports them as a warning.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARKER = "<!-- docs-test: skip -->"

#: Python blocks that are shown but not run: (page, first line of the block).
ILLUSTRATIVE = frozenset({
    # The one-line teaser of the front page; getting_started.md runs the same call.
    ("index.md", "import lipjax"),
})

#: Seconds one page may take (its blocks together, in a fresh process).
PAGE_TIMEOUT = 300
#: Pages run at the same time. Most of a page's time is XLA compiling, one
#: program at a time, so two pages in parallel use two cores.
WORKERS = int(os.environ.get("LIPJAX_DOCS_TEST_WORKERS", "2"))

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)(.*)$")


class Block(NamedTuple):
  page: str          # path relative to docs/
  line: int          # 1-based line of the first line of code
  language: str
  code: str
  skip: bool


def guide_pages() -> List[Path]:
  """The pages whose code must run: the front page, getting started and every guide."""
  return ([DOCS / "index.md", DOCS / "getting_started.md"]
          + sorted((DOCS / "guides").glob("*.md")))


def extract_blocks(path: Path) -> List[Block]:
  """The fenced code blocks of a Markdown page, in order."""
  lines = path.read_text(encoding="utf-8").splitlines()
  blocks, i = [], 0
  rel = str(path.relative_to(DOCS)) if path.is_relative_to(DOCS) else path.name
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence, language = len(m.group(1)), m.group(2), m.group(3).lower()
    skip = i > 0 and lines[i - 1].strip() == SKIP_MARKER
    start = i + 1
    j = start
    closing = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
    while j < len(lines) and not closing.match(lines[j]):
      j += 1
    if j == len(lines):
      raise ValueError(f"{rel}:{i + 1}: code fence never closed")
    body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[start:j]]
    blocks.append(Block(rel, start + 1, language, "\n".join(body) + "\n", skip))
    i = j + 1
  return blocks


def python_blocks(path: Path) -> List[Block]:
  return [b for b in extract_blocks(path) if b.language in ("python", "py", "python3")]


# Runs in the page's own process: executes the blocks in order in one namespace.
_RUNNER = r"""
import json, sys, time, traceback
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for b in blocks:
  code = compile("\n" * (b["line"] - 1) + b["code"], b["page"], "exec")
  start = time.perf_counter()
  try:
    exec(code, namespace)
  except BaseException:
    traceback.print_exc()
    print(f"DOCS BLOCK FAILED: {b['page']}, block starting at line {b['line']}", flush=True)
    sys.exit(1)
  print(f"docs block ok: {b['page']}:{b['line']} ({time.perf_counter() - start:.1f} s)",
        flush=True)
"""


def run_blocks(blocks: List[Block], tmpdir=None) -> subprocess.CompletedProcess:
  """Runs the blocks in order in one fresh process (temporary files under ``tmpdir``)."""
  env = dict(os.environ)
  if tmpdir is not None:
    env["TMPDIR"] = str(tmpdir)                        # what tempfile.mkdtemp() uses
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  env.setdefault("LIPJAX_COMPILATION_CACHE", "")      # no persistent cache written
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  payload = json.dumps([b._asdict() for b in blocks])
  return subprocess.run([sys.executable, "-c", _RUNNER], input=payload, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=PAGE_TIMEOUT, check=False)


PAGES = guide_pages()
#: The pages with python blocks to run (index.md: illustrative only; reproducing.md and
#: benchmarks.md: shell blocks only).
RUN_PAGES = [p for p in PAGES if p.exists() and any(not b.skip for b in python_blocks(p))]


def test_guide_pages_exist():
  names = {p.name for p in PAGES if p.exists()}
  for name in ("getting_started.md", "certify.md", "training.md", "flax_models.md",
               "residual.md", "custom_rules.md", "composing.md", "guarantees.md",
               "reproducing.md", "benchmarks.md"):
    assert name in names, f"docs page {name} is missing"


def test_illustrative_blocks_are_listed():
  """Every block marked as not run is listed in ILLUSTRATIVE (and reported)."""
  marked = {(b.page, b.code.splitlines()[0] if b.code.strip() else "")
            for p in PAGES for b in python_blocks(p) if b.skip}
  assert marked == set(ILLUSTRATIVE), (
      f"python blocks marked '{SKIP_MARKER}' differ from ILLUSTRATIVE: "
      f"marked but not listed {sorted(marked - set(ILLUSTRATIVE))}, "
      f"listed but not marked {sorted(set(ILLUSTRATIVE) - marked)}")
  for page, first in sorted(marked):
    warnings.warn(f"docs block not run (illustrative): {page}: {first!r}")


def test_extractor_sees_blocks_and_markers(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("# t\n\n```python\nx = 1\n```\n\n```bash\nexit 1\n```\n\n"
                  f"{SKIP_MARKER}\n```python\nundefined_name\n```\n\n"
                  "- item\n\n  ```python\n  y = x + 1\n  ```\n", encoding="utf-8")
  blocks = [b for b in extract_blocks(page)]
  assert [(b.language, b.skip, b.line) for b in blocks] == [
      ("python", False, 4), ("bash", False, 8), ("python", True, 13), ("python", False, 19)]
  assert blocks[3].code == "y = x + 1\n"


def test_failing_block_fails_the_page(tmp_path):
  """The runner exits non-zero and names the block when a block raises."""
  blocks = [Block("p.md", 3, "python", "x = 1\n", False),
            Block("p.md", 9, "python", "assert x == 2, 'wrong'\n", False)]
  proc = run_blocks(blocks)
  assert proc.returncode != 0
  assert "block starting at line 9" in proc.stdout
  assert 'File "p.md", line 9' in proc.stderr


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory):
  """Starts the process of every selected page (WORKERS at a time); each test
  waits for its own."""
  selected = [item.callspec.params["page"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_page_code_runs"]
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(WORKERS, 1))
  futures = {page: pool.submit(run_blocks, [b for b in python_blocks(page) if not b.skip],
                               tmp_path_factory.mktemp(page.stem))
             for page in selected}
  yield futures
  for future in futures.values():
    future.cancel()
  pool.shutdown(wait=True)


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, page_runs):
  blocks = [b for b in python_blocks(page) if not b.skip]
  proc = page_runs[page].result()
  if proc.returncode != 0:
    pytest.fail(f"a code block of docs/{page.relative_to(DOCS)} raised:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", pytrace=False)
  assert proc.stdout.count("docs block ok:") == len(blocks)
