"""Readers of published dataset formats, each yielding ``datamodules.samples`` records (``dim``: DIM tos jsonl)."""
