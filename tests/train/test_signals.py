"""Stop requests: signals set the flag; so does nearing the Slurm time limit, with a margin that
never eats the whole run."""

import os
import signal
import time

from hpcllm.train.signals import StopRequest


def test_signal_sets_the_flag_and_uninstall_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest(end_time=None).install()
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.requested() and stop.reason == "signal SIGUSR2"
    stop.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is before


def test_time_limit_margin():
    stop = StopRequest(margin_s=30, end_time=time.time() + 300)
    assert stop.margin_s == 30 and not stop.requested()
    stop.end_time = time.time() + 20  # 20 s later in the run
    assert stop.requested() and stop.reason == "within 30 s of the Slurm time limit"


def test_margin_longer_than_the_job_is_cut_to_half_the_time_left():
    # a 1-minute job with the default 120 s margin must still train for half a minute per start
    stop = StopRequest(margin_s=120, end_time=time.time() + 60)
    assert 29 <= stop.margin_s <= 30
    assert not stop.requested()
