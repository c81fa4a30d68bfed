"""Helpers the tests share: isolated settings, a feature workspace, tiny trained models.

Nothing in the product imports this package; the test modules and ``conftest.py`` do.
"""
