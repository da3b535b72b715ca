"""The scripts a user runs first: `scripts/test.sh` gives -k and -m to both of its passes,
and the install they make imports `ifa_tf` itself from the clone's parent directory (where
the clone, named ifa_tf, would otherwise be taken for the package)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(*args):
    process = subprocess.run(["bash", "scripts/test.sh", *args], cwd=REPO, text=True,
                             capture_output=True, env={**os.environ,
                                                       "IFA_TF_TEST_DRY_RUN": "1"})
    assert process.returncode == 0, process.stderr
    return process.stdout.splitlines()


def test_filters_reach_both_passes():
    tensorflow, jax = dry_run("-k", "readme or cli", "-x")
    assert tensorflow.endswith("pytest -q -k readme\\ or\\ cli -x ")
    assert jax.endswith("pytest -q -m jax\\ and\\ not\\ slow -k readme\\ or\\ cli tests ")
    tensorflow, jax = dry_run("-m", "slow", "-v", "tests/test_zoo.py")
    assert tensorflow.endswith("pytest -v -m slow tests/test_zoo.py ")
    assert jax.endswith("pytest -v -m jax\\ and\\ \\(slow\\) tests ")
    assert dry_run()[0].endswith("pytest -q ")  # one -q: the summary line stays


def test_the_package_is_found_from_the_clones_parent_directory(tmp_path):
    probe = ("import sys; print(sys.argv[1] in [p.rstrip('/') for p in sys.path]); "
             "import ifa_tf.serving as s; print(s.__file__)")
    installed = subprocess.run([sys.executable, "-c", probe, REPO], cwd="/", text=True,
                               capture_output=True, timeout=120)
    if installed.stdout.split()[0] != "True" and not os.environ.get(
            "IFA_TF_INSTALLED_BY_SCRIPTS"):
        pytest.skip("ifa_tf is installed in setuptools' strict editable mode, not as "
                    "scripts/venv.sh installs it (editable_mode=compat)")
    os.symlink(REPO, tmp_path / "ifa_tf")  # a clone named ifa_tf, and its parent
    process = subprocess.run([sys.executable, "-c", probe, REPO], cwd=tmp_path, text=True,
                             capture_output=True, timeout=120)
    assert process.stdout.split()[1] == os.path.join(REPO, "ifa_tf", "serving",
                                                     "__init__.py"), process.stderr
