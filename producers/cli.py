"""`aigc submit` and `aigc watch` (filled in with the SDK)."""

from __future__ import annotations

import argparse


def register(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    return None
