"""Torch's CPU threads spin briefly, then sleep, in every entry script (utils/threads.py), unless the user
says otherwise: the setting must be in the environment when torch first loads OpenMP."""

import json
import os
import subprocess
import sys

import pytest

from utils.threads import BRIEF_WAIT, WAIT_SETTINGS, wait_briefly

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry_scripts():
    names = []
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                if 'if __name__ == "__main__":' in f.read():
                    names.append(name)
    return names


# Runs a script with --help and prints, as its last line, the wait settings in the environment
# at the moment torch is first imported (null when the script never imports it).
PROBE = """
import json, os, runpy, sys
settings, seen = {settings!r}, []
def on_import(event, args):
    if event == "import" and args[0] == "torch" and not seen:
        seen.append({{name: os.environ.get(name) for name in settings}})
sys.addaudithook(on_import)
sys.path.insert(0, {root!r})
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit:
    pass
print()
print(json.dumps(seen[0] if seen else None))
"""


def settings_when_torch_loads(script, **user_settings):
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    env.update(user_settings, OMP_NUM_THREADS="1")
    code = PROBE.format(settings=WAIT_SETTINGS, root=ROOT, script=os.path.join(ROOT, script))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_scripts_are_found():
    assert {"train.py", "caption.py", "evaluate_models.py", "lxmert_match.py", "visualize.py"} <= set(entry_scripts())


@pytest.mark.parametrize("script", entry_scripts())
def test_entry_script_waits_briefly_from_torchs_first_import(script):
    seen = settings_when_torch_loads(script)
    if seen is None:
        pytest.skip(f"{script} does not load torch")
    assert seen == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": None}


def test_entry_script_keeps_the_users_setting():
    seen = settings_when_torch_loads("train.py", GOMP_SPINCOUNT="300000")
    assert seen == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000", "KMP_BLOCKTIME": None}


@pytest.mark.parametrize(
    "name, value", [("OMP_WAIT_POLICY", "active"), ("GOMP_SPINCOUNT", "1000"), ("KMP_BLOCKTIME", "0")]
)
def test_wait_briefly_keeps_any_wait_setting(name, value):
    environ = {name: value}
    wait_briefly(environ)
    assert environ == {name: value}


def test_wait_briefly_sets_a_short_spin_when_nothing_is_given():
    environ = {"OMP_NUM_THREADS": "2"}
    wait_briefly(environ)
    assert environ == {"OMP_NUM_THREADS": "2", **BRIEF_WAIT}


# Two threads do a short parallel operation, then the process sleeps 2 ms, 200 times: a pool
# thread that spins (libgomp's default: ~300,000 iterations) burns CPU through the sleeps.
IDLE_CPU = """
import utils.threads
import json, time, torch
torch.set_num_threads(2)
x = torch.rand(200_000)
start = time.process_time()
for _ in range(200):
    x.exp()
    time.sleep(0.002)
print(json.dumps(time.process_time() - start))
"""


def idle_cpu_seconds(**user_settings):
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS + ("OMP_NUM_THREADS",)}
    env.update(user_settings)
    out = subprocess.run(
        [sys.executable, "-c", IDLE_CPU], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_runtime_torch_loads_sleeps_when_idle():
    """The OpenMP runtime honours the setting: far less CPU time than with libgomp's default spin."""
    spinning = idle_cpu_seconds(GOMP_SPINCOUNT="300000")  # libgomp's default, given explicitly
    brief = idle_cpu_seconds()
    assert brief < spinning / 3, (brief, spinning)
