"""Interop fixtures: a real Yjs client, installed from the project's own lock file.

``npm ci`` runs when ``tests/interop/yjs/node_modules`` is missing or holds another ``yjs`` than
``package-lock.json`` pins. These tests never skip: without ``node`` and ``npm`` they fail and say
what is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .yjs_client import YJS_DIR, YjsClient

NPM_CI_TIMEOUT_S = 600.0


def _pinned_yjs_version() -> str:
    lock = json.loads((YJS_DIR / "package-lock.json").read_text())
    version: str = lock["packages"]["node_modules/yjs"]["version"]
    return version


def _installed_yjs_version() -> str | None:
    manifest = YJS_DIR / "node_modules" / "yjs" / "package.json"
    if not manifest.exists():
        return None
    version: str = json.loads(manifest.read_text())["version"]
    return version


@pytest.fixture(scope="session")
def yjs() -> YjsClient:
    """A :class:`YjsClient` on the pinned ``yjs`` (installed with ``npm ci`` when needed)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"the Yjs interop tests need `{tool}` on PATH (install Node.js 18 or newer)")
    if _installed_yjs_version() != _pinned_yjs_version():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=YJS_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
        )
        if done.returncode != 0:
            pytest.fail(f"`npm ci` in {YJS_DIR} failed:\n{done.stderr[-4000:]}")
        assert _installed_yjs_version() == _pinned_yjs_version()
    return YjsClient()
