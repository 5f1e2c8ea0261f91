"""A script for the command-line tests that forgot to decorate its step."""

from __future__ import annotations


def train(state: object, step: int) -> None:
    """An undecorated step body."""
