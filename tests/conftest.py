"""Plugins of the whole suite: the fault table of the ``faults`` tests (:mod:`tests.helpers.faults`)."""

pytest_plugins = ["tests.helpers.faults"]
