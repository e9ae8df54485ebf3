"""``deploy/netns/testbed.py`` imported as the module ``testbed`` for the tests.

The testbed builder is a standalone script under ``deploy/`` (standard library only, runnable
without the package installed), not part of an installed package, so it is loaded by path. Both
tiers use it: ``tests/unit`` checks its plan without root, ``tests/netns`` builds it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TESTBED_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "netns" / "testbed.py"
_MODULE_NAME = "lattica_deploy_netns_testbed"


def _load() -> ModuleType:
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, TESTBED_SCRIPT)
    assert spec is not None and spec.loader is not None, TESTBED_SCRIPT
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules.
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


testbed = _load()
