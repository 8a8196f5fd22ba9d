"""CI runs what the README tells users to run."""

import os
import re

from conftest import ROOT
import shutil
import subprocess
import sys


def readme_command(comment):
    """The command on the line after `# comment` in README.md's first code block."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    match = re.search(rf"^# {re.escape(comment)}.*\n(.+)$", first_block, re.MULTILINE)
    assert match, f"README.md's first code block has no '# {comment}' line"
    return match.group(1)


def test_ci_ends_with_the_readmes_test_command():
    script = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().rstrip("\n").splitlines()
    assert script[-1] == readme_command("install and run the tests")


def test_the_readmes_demo_command_makes_its_environment_and_runs_the_demo():
    command = readme_command("install and run the demo")
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert command.endswith(" && python3 train.py --demo")


def test_the_readmes_install_takes_torch_and_torchvision_as_one_pair():
    # torchvision's compiled operators load only into the torch build they were made for.
    for comment in ("install and run the demo", "install and run the tests"):
        assert re.search(r"\btorch==\S+ torchvision==\S+ ", readme_command(comment))


def test_pytest_shows_why_tests_skip(tmp_path):
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    (tmp_path / "test_skips.py").write_text('import pytest\n\n\ndef test_it():\n    pytest.skip("the reason")\n')
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_skips.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "SKIPPED [1] test_skips.py:5: the reason" in done.stdout, done.stdout
