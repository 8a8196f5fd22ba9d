"""How torch's CPU threads wait for work: imported by every entry script before torch.

By default the OpenMP runtime of torch's Linux builds (libgomp) keeps each idle thread of its
intra-op pool spinning for about 300,000 iterations before it sleeps. On a machine of one's
own that saves a wake-up; on cores shared with other jobs the spinning threads take the time
the other jobs' threads (and the partner they wait for) need, and a training run beside
others runs many times slower than its fair share (bench/shared_cores.py measures it).
A short spin (1,000 iterations) keeps the quiet-machine speed, since a thread woken for the
next parallel region is usually still spinning, and yields the cores almost at once when other
jobs need them; runtimes other than libgomp, which ignore GOMP_SPINCOUNT, wait passively.

The runtime reads these variables once, when torch first loads it, so this module must be
imported before torch; a setting the user gives is kept.
"""

import os

# Any of these says how OpenMP threads wait (OpenMP's own, libgomp's, and Intel/LLVM libomp's).
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# libgomp takes GOMP_SPINCOUNT over OMP_WAIT_POLICY; other runtimes read only the latter.
BRIEF_WAIT = {"GOMP_SPINCOUNT": "1000", "OMP_WAIT_POLICY": "PASSIVE"}


def wait_briefly(environ):
    """Sets BRIEF_WAIT in `environ` unless it already says how threads wait."""
    if not any(name in environ for name in WAIT_SETTINGS):
        environ.update(BRIEF_WAIT)


wait_briefly(os.environ)
