"""Sizes as logs, the status page and the CLI print them: the config file's own notation."""
from __future__ import annotations

import pytest

from metahub.config.file import parse_size
from metahub.oci.sizes import format_size


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0B"), (1023, "1023B"), (1024, "1KiB"), (1536, "1.5KiB"), (5 * 2**20, "5MiB"),
     (200 * 2**30, "200GiB"), (3 * 2**50, "3PiB"), (2**60, "1024PiB"), (1.5e3, "1.465KiB")],
)
def test_the_largest_unit_that_keeps_at_least_one(size: float, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("size", [0, 1023, 1536, 200 * 2**30, 3 * 2**50])
def test_a_printed_size_reads_back_as_the_config_file_size(size: int) -> None:
    assert parse_size(format_size(size)) == size
