"""How the executor's OpenMP threads wait between parallel regions; set before torch is imported.

GNU OpenMP (what torch's CPU wheel links) spins a worker that finished its part of a parallel region
for a while before it sleeps. When anything else runs on the cores (the scheduler process, gRPC
threads, a second executor), a spinning worker holds the core the late one needs, and every region
waits for the late one: measured on a 2-core machine with another process busy, workload A's forward
took 46-47 s with two threads spinning against 15-17 s with `OMP_WAIT_POLICY=PASSIVE` (and 14-18 s
with one thread); Intel's OpenMP preloaded in its place measured the same as passive. Passive is the
default here; a value the user set (`OMP_WAIT_POLICY`, or GNU's `GOMP_SPINCOUNT`) is kept.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
DEFAULT_WAIT_POLICY = "PASSIVE"


def apply_openmp_defaults(environ: MutableMapping[str, str]) -> bool:
    """Sets `OMP_WAIT_POLICY=PASSIVE` in `environ` unless the user chose a wait policy; True if set.

    Only before torch (and so its OpenMP runtime) is loaded: the runtime reads the environment once,
    when it starts. Once torch is loaded (the CLI called in-process, as tests do) it changes nothing
    and returns False."""
    if sys.modules.get("torch") is not None:
        return False
    if WAIT_POLICY_ENV in environ or SPIN_COUNT_ENV in environ:
        return False
    environ[WAIT_POLICY_ENV] = DEFAULT_WAIT_POLICY
    return True
