"""The open files limit: raised to the hard limit at startup, said in the log, left alone when high."""
from __future__ import annotations

import resource

import pytest

from metahub.runtime import limits
from metahub.runtime.limits import UNLIMITED_TARGET, raise_open_files_limit


class Limits:
    """getrlimit/setrlimit for RLIMIT_NOFILE, without touching the test process's own."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, values: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.soft, self.hard = values


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def install(soft: int, hard: int, refuse: bool = False) -> Limits:
        fake = Limits(soft, hard, refuse)
        monkeypatch.setattr(limits.resource, "getrlimit", fake.getrlimit)
        monkeypatch.setattr(limits.resource, "setrlimit", fake.setrlimit)
        return fake
    return install


def test_a_low_soft_limit_is_raised_to_the_hard_one_and_logged(fake) -> None:
    nofile = fake(1024, 524288)
    line = raise_open_files_limit()
    assert (nofile.soft, nofile.hard) == (524288, 524288)
    assert line is not None and "from 1024 to 524288" in line


def test_a_soft_limit_at_the_hard_one_is_left_alone(fake) -> None:
    nofile = fake(20000, 20000)
    assert raise_open_files_limit() is None and nofile.soft == 20000


def test_an_unlimited_hard_limit_gets_a_number(fake) -> None:
    nofile = fake(256, resource.RLIM_INFINITY)
    assert raise_open_files_limit() is not None
    assert nofile.soft == UNLIMITED_TARGET and nofile.hard == resource.RLIM_INFINITY


def test_a_refusal_is_logged_and_startup_goes_on(fake) -> None:
    nofile = fake(1024, 4096, refuse=True)
    line = raise_open_files_limit()
    assert nofile.soft == 1024 and line is not None and "limited to 1024" in line and "ulimit -n" in line
