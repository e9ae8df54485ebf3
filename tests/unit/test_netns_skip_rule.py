"""When tests/netns skip, run or fail (issue 9): skip only when not root and not in CI; a
missing tool is a failure that names the Debian package."""

from __future__ import annotations

import pytest

from tests.netns import harness


def test_not_root_outside_ci_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        harness.require_netns()


def test_not_root_in_ci_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run them as root"):
        harness.require_netns()


@pytest.mark.parametrize("ci", [None, "true"])
def test_root_without_the_tools_fails_naming_the_packages(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    monkeypatch.setattr(harness.os, "geteuid", lambda: 0)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(pytest.fail.Exception, match=r"iproute2.*nftables"):
        harness.require_netns()
