"""The restart policy and the crash window: pure arithmetic, no processes."""

from __future__ import annotations

import pytest

from orchestrator.recovery import PUBLIC_REASONS, CrashWindow, Failure, RestartPolicy


def test_the_backoff_doubles_per_crash_and_is_capped() -> None:
    policy = RestartPolicy(max_restarts=10, window_s=60, backoff_s=2, backoff_max_s=30)
    assert [policy.delay_s(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    # Far past the cap, no overflow.
    assert policy.delay_s(5000) == 30


def test_the_window_forgets_old_crashes_and_calls_one_too_many_a_loop() -> None:
    window = CrashWindow(RestartPolicy(max_restarts=2, window_s=10))
    assert window.record(100.0) == 1
    assert window.record(101.0) == 2
    assert not window.is_loop(2)
    # The third within 10 s is one more than the two restarts allowed.
    assert window.record(105.0) == 3
    assert window.is_loop(3)
    # Ten seconds after the first, it no longer counts.
    assert window.count(110.0) == 2
    assert window.record(115.5) == 1
    window.clear()
    assert window.count(115.5) == 0


def test_restarts_can_be_turned_off_and_bad_policies_are_refused() -> None:
    assert not RestartPolicy(max_restarts=0).enabled
    assert RestartPolicy().enabled
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="window_s"):
        RestartPolicy(window_s=0)
    with pytest.raises(ValueError, match="backoff"):
        RestartPolicy(backoff_s=-1)


def test_every_failure_has_one_public_sentence_without_engine_details() -> None:
    assert set(PUBLIC_REASONS) == set(Failure)
    for failure, sentence in PUBLIC_REASONS.items():
        assert failure.value.startswith("engine_")
        assert sentence
        assert sentence == sentence.strip()
        # Fixed text: nothing that could come from an engine's output.
        assert not any(mark in sentence for mark in ("http", "/", ":", "{"))
