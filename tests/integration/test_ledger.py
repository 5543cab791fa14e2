"""The LEDGER benchmark on the real services: a tiny run in which every counter family counts.

With ``AIGC_TEST_EXTERNAL=1`` the JVMs are found through ``AIGC_INFRA__RUN_DIR`` (the run directory that
started them), as for `aigc infra status`.
"""

from __future__ import annotations

import pytest

from bench.scenarios import LedgerWorkload, run_ledger
from plumbing.settings import Settings

TINY = LedgerWorkload(image_rate=4.0, images=12, video_rate=1.0, videos=2, idle_s=2.0)


def test_a_tiny_ledger_counts_every_family(infra: Settings) -> None:
    result = run_ledger(infra, TINY)
    image, frame = result["image"], result["video_frame"]
    assert image["units"] == image["sent"] > 0 and frame["completed_videos"] == frame["sent"] > 0
    per_image = image["per_unit"]
    # One request record per completed request: nothing is produced twice, no request is left behind.
    assert per_image["kafka records"]["requests.normal"] == pytest.approx(1.0)
    assert per_image["kafka bytes on disk"]["requests.normal"] > 0
    for family in (
        "kafka requests (librdkafka)",
        "kafka requests (aiokafka)",
        "cql statements",
        "s3 calls",
        "cassandra (server)",
    ):
        assert per_image.get(family), family
        assert frame["per_unit"].get(family), family
    assert per_image["kafka transactions (EndTxn requests)"] > 0
    assert any("(LWT)" in kind for kind in per_image["cql statements"])
    totals = per_image["cpu ms totals"]
    assert totals["JVMs"] > 0 and totals["our Python stages"] > 0
    assert {"kafka", "cassandra", "s3proxy", "gatekeeper", "assembler"} <= set(per_image["cpu ms"])
    assert result["idle"]["broker_partitions"] > 0
