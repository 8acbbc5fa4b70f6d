"""qn_fairseq/compat.py: fairseq's prefetching thread is stopped before the interpreter exits (the native
abort "terminate called without an active exception" of fairseq-train after it saved its checkpoint)."""
import signal
import subprocess
import sys

from conftest import USER_DIR

# A BufferedIterator (what fairseq's epoch iterators wrap their batches in) over a source whose items are
# made by many small torch ops, as a masked-LM batch is (slowly: a thread blocked on a full queue is not in torch);
# the script takes one item and exits while the
# prefetching daemon thread is inside torch.  Without the plugin, CPython's pthread_exit of that thread at
# shutdown unwinds into a noexcept torch frame: SIGABRT.  The abort needs the thread to take the GIL while the
# interpreter finalizes, a window of milliseconds: at load average 12-20 the thread was not scheduled in it (0 of
# 3 aborts seen once), so the script holds that window open for 0.5 s (SlowExit) and the control is deterministic.
SCRIPT = """
import sys
import time
import torch
from fairseq.data import iterators
if sys.argv[1] != "-":
    from argparse import Namespace
    from fairseq import utils
    utils.import_user_module(Namespace(user_dir=sys.argv[1]))

class Busy:
    def __len__(self):
        return 10**6
    def __iter__(self):
        t = torch.zeros(16)
        while True:
            for _ in range(50000):  # ~0.1-0.3 s an item: the queue (2) is never full before exit
                t.eq(1)
            yield t

class SlowExit:
    def __del__(self):  # runs while the interpreter finalizes (after atexit): the GIL is free for 0.5 s, so a
        time.sleep(0.5)  # daemon thread still in torch takes it now, whatever the machine's load

slow_exit = SlowExit()
it = iterators.BufferedIterator(2, Busy())
next(it)
print("took one batch")
"""


def run_script(user_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, user_dir], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_the_prefetching_thread_is_stopped_before_exit_so_the_process_exits_0():
    for _ in range(3):
        out = run_script(USER_DIR)
        assert out.returncode == 0 and "took one batch" in out.stdout, (out.returncode, out.stderr[-2000:])
        assert "terminate called" not in out.stderr


def test_without_the_plugin_the_same_script_aborts_natively():
    """The control: the script above does reproduce fairseq's abort (so the test above can fail)."""
    codes = [run_script("-").returncode for _ in range(3)]
    assert -signal.SIGABRT in codes, codes
