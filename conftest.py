"""pytest only: collect the repository root as a plain folder, not as a Python package.

The root holds the pack's ``__init__.py`` (ComfyUI imports the folder as a package). pytest would
import that file on its own to look for ``setup_module``: that fails with "attempted relative import"
when the clone's folder name is not a Python identifier (``tmp.XYZ``), and imports a second copy of
the pack when it is. The tests import the pack themselves (tests/conftest.py).

A conftest's hooks do not apply to its own folder, so the hook is registered as a plugin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


class _RootAsFolder:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        if path == ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_RootAsFolder(), "diffusers_adapters_root_as_folder")
