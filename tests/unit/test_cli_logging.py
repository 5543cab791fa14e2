"""A client verb's librdkafka lines are debug detail: shown only when debug logging is on."""

from __future__ import annotations

import logging

import pytest

from aigc.cli import LIBRDKAFKA, _demote_to_debug


@pytest.mark.parametrize("root_level", [logging.INFO, logging.DEBUG])
def test_librdkafka_errors_become_debug_lines(root_level: int, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(LIBRDKAFKA)
    root = logging.getLogger()
    old = root.level
    root.setLevel(root_level)
    logger.addFilter(_demote_to_debug)
    try:
        with caplog.at_level(root_level):
            root.setLevel(root_level)
            logger.error("FAIL|rdkafka#producer-1| Connect to ipv4#127.0.0.1:1 failed: Connection refused")
    finally:
        logger.removeFilter(_demote_to_debug)
        root.setLevel(old)
    if root_level == logging.DEBUG:
        assert [(r.levelno, r.name) for r in caplog.records] == [(logging.DEBUG, LIBRDKAFKA)]
    else:
        assert caplog.records == []
