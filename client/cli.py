"""CLI commands of the client: keys, predict, demo."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
