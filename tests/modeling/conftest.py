"""Fixtures shared by the modeling tests; plain helpers are in helpers.py."""

from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.fixture(scope="session")
def root_conftest(pytestconfig):
    """tests/conftest.py as pytest loaded it (importing it by name would pick the wrong conftest)."""
    for _, plugin in pytestconfig.pluginmanager.list_name_plugin():
        file = getattr(plugin, "__file__", None)
        if file is not None and Path(file).resolve() == ROOT_CONFTEST:
            return plugin
    raise LookupError(f"{ROOT_CONFTEST} is not loaded")


@pytest.fixture(scope="session")
def make_teacher(root_conftest):
    """build_tiny_teacher(family, ...): hidden 64, 4 query / 2 key-value heads of 16, 4 layers."""
    return root_conftest.build_tiny_teacher
