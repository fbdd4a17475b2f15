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


def test_a_signal_before_the_trainer_starts_is_not_lost():
    from hpcllm.train.signals import catch_early_signals

    before = signal.getsignal(signal.SIGUSR2)
    try:
        catch_early_signals()
        os.kill(os.getpid(), signal.SIGUSR2)  # e.g. Slurm's warning while the job still imports torch
        stop = StopRequest(end_time=None).install()
        assert stop.requested() and stop.reason == "signal SIGUSR2"
        stop.uninstall()
        assert not StopRequest(end_time=None).install().requested()  # taken once
    finally:
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, before if sig == signal.SIGUSR2 else signal.SIG_DFL)


def test_warning_signal_is_cut_to_half_the_time_limit():
    from hpcllm.launch.config import SlurmConfig

    assert SlurmConfig(time="01:00:00").warning_signal_s() == 120
    assert SlurmConfig(time="00:01:00").warning_signal_s() == 30
    assert SlurmConfig(time="1-00:00:00", signal_delay_s=600).seconds() == 86400


def test_the_ranks_agree_on_a_reason_by_its_code():
    """The trainer allreduces (max) each rank's code: a rank that saw nothing names the reason of the
    one that did."""
    from hpcllm.train.signals import TIME_LIMIT

    quiet = StopRequest(margin_s=30, end_time=None)
    assert quiet.code() == 0
    stop = StopRequest(end_time=None).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.code() == int(signal.SIGUSR2)
    finally:
        stop.uninstall()
    assert quiet.describe(int(signal.SIGUSR2)) == "signal SIGUSR2" and quiet.describe(int(signal.SIGTERM)) == \
        "signal SIGTERM"
    near = StopRequest(margin_s=30, end_time=time.time() + 300)
    near.end_time = time.time() + 20  # later in the run
    assert near.code() == TIME_LIMIT > int(signal.SIGTERM)
    assert quiet.describe(TIME_LIMIT) == "within 30 s of the Slurm time limit"
