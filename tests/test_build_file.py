"""BUILD (Bazel) must name every source file of csrc/ and jax_moe/, and every test
module, so the Bazel declarations cannot silently fall behind CMake."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = {".h", ".cc", ".cu", ".cuh", ".py"}


def _sources(folder: str):
  return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
                if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)


def test_every_source_is_named_in_build():
  build = (ROOT / "BUILD").read_text()
  files = _sources("csrc") + _sources("jax_moe")
  assert len(files) > 20
  missing = [f for f in files if f'"{f}"' not in build]
  assert not missing, f"not named in BUILD: {missing}"


def test_every_test_module_is_named_in_build():
  build = (ROOT / "BUILD").read_text()
  tests = sorted(p.stem for p in (ROOT / "tests").glob("test_*.py"))
  missing = [t for t in tests if f'"{t}"' not in build]
  assert not missing, f"test modules not named in BUILD: {missing}"


def test_cmake_and_build_name_the_same_handlers():
  cmake = (ROOT / "CMakeLists.txt").read_text()
  build = (ROOT / "BUILD").read_text()
  for f in _sources("csrc"):
    if f.endswith((".cc", ".cu")):
      assert f in cmake, f"{f} is not compiled by CMakeLists.txt"
      assert f'"{f}"' in build
