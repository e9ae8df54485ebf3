"""The shared token bucket and the per-key limiter (lattica/token_bucket.py)."""

from __future__ import annotations

import pytest

from lattica.token_bucket import KeyedRateLimiter, TokenBucket


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket.full(rate_per_s=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.available(0.4) == pytest.approx(0.8)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)  # one token after 0.5 s at 2 per second
    assert bucket.available(100.0) == 3  # never above the burst
    assert not bucket.take(50.0, count=4)


def test_a_clock_that_went_back_earns_nothing() -> None:
    bucket = TokenBucket.full(rate_per_s=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert bucket.available(5.0) == 0 and not bucket.take(5.0)


def limiter(**overrides: float) -> KeyedRateLimiter:
    settings = {"per_key_rate_per_s": 1.0, "per_key_burst": 2, "total_rate_per_s": 10.0, "total_burst": 3}
    settings["max_keys"] = 2
    settings.update(overrides)
    return KeyedRateLimiter(**settings)  # type: ignore[arg-type]


def test_each_key_has_its_share_and_all_keys_share_the_total() -> None:
    limits = limiter()
    assert [limits.allow("a", 0.0) for _ in range(3)] == [True, True, False]  # a's burst
    assert limits.allow("b", 0.0)  # the total's third token
    assert not limits.allow("c", 0.0)  # c is fresh, the total is empty: nothing spent of c
    assert limits.allow("c", 0.1)  # 0.1 s at 10/s: one token in the total again
    assert not limits.allow("c", 0.1)  # ... spent; c still has one of its own


def test_a_refusal_spends_nothing() -> None:
    limits = limiter(total_burst=1, total_rate_per_s=1.0)
    assert limits.allow("a", 0.0)
    assert not limits.allow("b", 0.0)  # the total refused: b's bucket stays full
    assert limits.allow("b", 1.0) and not limits.allow("b", 1.0)  # total again empty
    assert limits.allow("b", 2.0)  # b spent one of two: its second is still there


def test_memory_is_bounded_and_a_forgotten_key_starts_full() -> None:
    limits = limiter(max_keys=2, total_burst=1000, total_rate_per_s=1000.0)
    assert limits.allow("a", 0.0) and limits.allow("a", 0.0) and not limits.allow("a", 0.0)
    for key in ("b", "c"):  # a is the least recently used: forgotten
        assert limits.allow(key, 0.0)
    assert len(limits._by_key) == 2
    assert limits.allow("a", 0.0)


@pytest.mark.parametrize("bad", [{"per_key_rate_per_s": 0.0}, {"total_burst": 0.5}, {"max_keys": 0}])
def test_nonsense_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        limiter(**bad)
