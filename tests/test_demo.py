"""The README's main job, ``python -m gpuhnsw.demo``: it finds the shared data wherever the package
is installed from, says where it looked when it does not, and reports device, build, QPS and recall."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpuhnsw
from gpuhnsw import testing

ROOT = Path(__file__).resolve().parent.parent


def demo(*args, cwd, env=None, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "GHNSW_DATA"} | (env or {})
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "gpuhnsw.demo", "--device", "cpu", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory):
    """The package copied outside the source tree, as ``pip install .`` leaves it in site-packages."""
    site = tmp_path_factory.mktemp("site-packages")
    shutil.copytree(Path(gpuhnsw.__file__).parent, site / "gpuhnsw", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", site / "gpuhnsw" / "kernels", dirs_exist_ok=True)
    return site


@pytest.mark.parametrize("where", ["beside", "inside"])
def test_installed_package_finds_the_data_from_the_working_directory(dataset_folder, installed_copy, tmp_path,
                                                                     where):
    """After a plain (not editable) install the demo looked for ../shared/data beside site-packages
    only, fell back to generated vectors and did not say so; it now also looks from the working
    directory (a checkout beside ``shared/``, or a folder holding it)."""
    dataset_folder("siftsmall")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(testing.data_dir(), target_is_directory=True)
    cwd = tmp_path / "checkout" if where == "beside" else tmp_path
    cwd.mkdir(exist_ok=True)
    out = demo("--dataset", "siftsmall", "--n", "2000", cwd=cwd, pythonpath=installed_copy)
    assert out.returncode == 0, out.stderr
    assert "siftsmall (l2), 2,000 x 128" in out.stdout and "recall@10" in out.stdout
    where_from = subprocess.run([sys.executable, "-c", "import gpuhnsw; print(gpuhnsw.__file__)"], cwd=cwd,
                                env={**os.environ, "PYTHONPATH": str(installed_copy)}, capture_output=True, text=True)
    assert where_from.stdout.startswith(str(installed_copy)), where_from   # the copy ran, not the source tree


def test_without_data_it_says_where_it_looked(installed_copy, tmp_path):
    out = demo("--n", "2000", cwd=tmp_path, pythonpath=installed_copy)
    assert out.returncode == 0, out.stderr
    assert re.search(r"no shared dataset found \(looked in .*shared/data.*; pass --data DIR or set GHNSW_DATA\)",
                     out.stdout), out.stdout
    assert "generated (l2), 2,000 x 64" in out.stdout and "recall@10" in out.stdout


def test_data_option(dataset_folder, installed_copy, tmp_path):
    dataset_folder("siftsmall")
    out = demo("--data", str(testing.data_dir()), "--dataset", "siftsmall", "--n", "1000", cwd=tmp_path,
               pythonpath=installed_copy)
    assert out.returncode == 0 and "siftsmall (l2), 1,000 x 128" in out.stdout, out.stderr
    missing = demo("--data", str(tmp_path / "nope"), cwd=tmp_path, pythonpath=installed_copy)
    assert missing.returncode == 2 and "--data" in missing.stderr and "no such folder" in missing.stderr
    absent = demo("--data", str(tmp_path), "--dataset", "siftsmall", cwd=tmp_path, pythonpath=installed_copy)
    assert absent.returncode == 2 and f"looked in {tmp_path}" in absent.stderr
