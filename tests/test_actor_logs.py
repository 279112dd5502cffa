"""faascale's log lines from inside a Ray actor carry the time (``faascale/actor_logs.py``): a
real local Ray, an actor that installs the handler and logs, its stderr as Ray streams it to
the driver. In the driver itself nothing changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

SCRIPT = """
import logging, sys
import ray
from faascale.actor_logs import timestamp_logs

@ray.remote(num_cpus=0)
class Actor:
    def __init__(self):
        timestamp_logs()
        timestamp_logs()  # idempotent: one handler, one line per record

    def log(self):
        logging.getLogger("faascale.pipecast.test").warning("a member went quiet")
        logging.getLogger("faascale.pipecast.test").info("planned")
        return len(logging.getLogger("faascale").handlers)

ray.init(address="local", num_cpus=1, include_dashboard=False)
print("driver handler:", timestamp_logs(), flush=True)
a = Actor.remote()
print("actor handlers:", ray.get(a.log.remote()), flush=True)
import time; time.sleep(2)  # Ray streams the worker's stderr to this process
ray.shutdown()
"""


def test_an_actors_faascale_lines_carry_the_time_and_the_drivers_are_untouched() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "driver handler: None" in out  # a driver keeps its own logging
    assert "actor handlers: 1" in out
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    lines = re.findall(rf"{stamp} (WARNING|INFO) faascale\.pipecast\.test: (.*)", out)
    assert lines == [("WARNING", "a member went quiet"), ("INFO", "planned")], out[-3000:]
