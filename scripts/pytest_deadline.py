"""pytest plugin: a per-test time limit that needs no pytest-timeout.

    pytest -p pytest_deadline --deadline 60 ...      (scripts/ on PYTHONPATH)

A test still running after --deadline seconds makes its process print every thread's traceback
and exit (faulthandler), which also ends a hung GPU kernel with the process's CUDA context. Under
pytest-xdist the worker's crash fails that one test and a new worker takes the rest; without
xdist the run stops there (the caller's own `timeout` then reports it). 0 disables the limit.
"""

import faulthandler
import os

import pytest

# The real stderr, duplicated when the plugin is imported (before pytest captures fd 2), so the
# tracebacks of a hung test reach the log rather than a capture file that dies with the process.
_STDERR = os.fdopen(os.dup(2), "w")


def pytest_addoption(parser):
    parser.addoption("--deadline", type=float, default=0.0,
                     help="seconds a single test may run before its process is ended (0: off)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = item.config.getoption("deadline")
    if limit > 0:
        faulthandler.dump_traceback_later(limit, exit=True, file=_STDERR)
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()
