"""`make test-dist`: the sdist and the wheel install into fresh virtual environments and pass the op
tests from the installed (not editable) copy.

1. ``python -m build --no-isolation`` makes the sdist, then the wheel from the sdist (so the sdist
   must hold every source and header the build needs); the sdist's file list is checked against
   the repository's csrc/ and pyops/.
2. Two fresh venvs: the wheel is installed into one, the sdist (compiled again by pip) into the
   other, both with ``--no-build-isolation --no-deps``, as torch extensions are installed. Each venv
   sees the packages of the interpreter running this script (torch, numpy, pytest, setuptools,
   ninja ...) through a .pth file appended after its own site-packages: torch is "already there",
   and the installed pyops comes first.
3. In each venv, from a folder holding only the op tests (no checkout on sys.path): pyops imports
   from the venv's site-packages, its version, py.typed and license are there, no top-level
   ``methods`` package was installed, and the op tests pass.

Run by `make test-dist` (13 minutes on 2 idle cores: two builds of the C++ extension).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def op_tests(tests_dir: str) -> list[str]:
    """The op tests: test files that do not import the methods and need neither a GPU nor the
    Triton interpreter process (the selection of the Makefile's OP_TESTS)."""
    out = []
    for path in sorted(glob.glob(os.path.join(tests_dir, "test_*.py"))):
        name = os.path.basename(path)
        if name.startswith(("test_cuda", "test_triton_interpret", "test_knn_patch_triton")):
            continue
        src = open(path).read()
        if any(line.lstrip().startswith(("from methods", "import methods")) for line in src.splitlines()):
            continue
        out.append(name)
    return out


def check_sdist(sdist: str) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    need = {
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
        if os.path.isfile(p)
    }
    need |= {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "pyops", "*.py"))}
    need |= {"setup.py", "pyproject.toml", "LICENSE", "README.md", "pyops/py.typed", "tests/conftest.py"}
    missing = sorted(need - names)
    if missing:
        sys.exit(f"dist_check: the sdist {os.path.basename(sdist)} lacks {missing}")
    stray = sorted(n for n in names if n.startswith(("methods/", "benchmarks/")))
    if stray:
        sys.exit(f"dist_check: the sdist holds files of the checkout only: {stray[:5]} ...")
    print(f"sdist: {len(names)} files, every csrc/ and pyops/ file present", flush=True)


def fresh_venv(path: str) -> tuple[str, dict]:
    shutil.rmtree(path, ignore_errors=True)
    venv.create(path, with_pip=True)
    py = os.path.join(path, "bin", "python")
    # ensurepip's setuptools (65 on Python 3.11) would come before this environment's and cannot
    # read the SPDX license field (setuptools >= 77): the build uses this environment's instead
    subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=False, capture_output=True)
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(site, "_pyops_dist_check_base.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. of the running interpreter, after the venv's own
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # the build's tools (ninja) of the running interpreter's environment, after the venv's own
    env["PATH"] = os.pathsep.join([os.path.join(path, "bin"), os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONSAFEPATH"] = "1"
    return py, env


CHECK = r"""
import importlib.util, os, sys, importlib.metadata as md
import pyops
prefix = sys.argv[1]
assert os.path.realpath(pyops.__file__).startswith(os.path.realpath(prefix)), pyops.__file__
assert os.path.realpath(pyops._C.__file__).startswith(os.path.realpath(prefix)), pyops._C.__file__
assert pyops.__version__ == md.version("pyops") == sys.argv[2], (pyops.__version__, md.version("pyops"), sys.argv[2])
assert os.path.exists(os.path.join(os.path.dirname(pyops.__file__), "py.typed")), "py.typed not installed"
files = [str(f) for f in md.files("pyops")]
assert any(f.endswith("LICENSE") for f in files), "no LICENSE in the installed metadata"
assert not any(f.startswith(("methods/", "benchmarks/")) for f in files), [f for f in files if f.startswith("methods/")][:3]
assert importlib.util.find_spec("methods") is None, importlib.util.find_spec("methods")
print("installed:", pyops.__file__, "version", pyops.__version__, "| backends:", pyops.backends()["cpu_isa"])
"""


def install_and_test(kind: str, artifact: str, work: str, tests_src: str, version: str, pytest_args: list) -> None:
    print(f"\n== {kind}: {os.path.basename(artifact)} into a fresh venv", flush=True)
    prefix = os.path.join(work, f"venv-{kind}")
    py, env = fresh_venv(prefix)
    run(
        [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--ignore-installed", artifact],
        env=env,
        cwd=work,
    )
    tests = os.path.join(work, f"tests-{kind}")
    shutil.rmtree(tests, ignore_errors=True)
    os.makedirs(tests)
    names = op_tests(tests_src)
    for name in ["conftest.py"] + names:
        shutil.copy(os.path.join(tests_src, name), tests)
    shutil.copy(os.path.join(os.path.dirname(tests_src), "README.md"), work)  # its examples are tested too
    run([py, "-c", CHECK, prefix, version], env=env, cwd=tests)
    run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, *names], env=env, cwd=tests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "dist-check"), help="scratch folder (emptied)")
    ap.add_argument("--only", choices=("wheel", "sdist"), help="install and test only this artifact")
    a, pytest_args = ap.parse_known_args()  # the rest goes to pytest (e.g. -x)
    shutil.rmtree(a.work, ignore_errors=True)
    dist = os.path.join(a.work, "dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=ROOT)
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    check_sdist(sdist)
    version = os.path.basename(wheel).split("-")[1]
    # the tests as shipped in the sdist
    with tarfile.open(sdist) as tar:
        tar.extractall(os.path.join(a.work, "sdist-src"), filter="data")
    (src,) = glob.glob(os.path.join(a.work, "sdist-src", "*"))
    for kind, artifact in (("wheel", wheel), ("sdist", sdist)):
        if a.only in (None, kind):
            install_and_test(kind, artifact, a.work, os.path.join(src, "tests"), version, pytest_args)
    print("\ndist_check: the sdist and the wheel install into fresh venvs and pass the op tests", flush=True)


if __name__ == "__main__":
    main()
