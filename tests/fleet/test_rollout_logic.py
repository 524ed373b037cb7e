"""The rollout's pure decisions: waves, selection, timeouts, rate limits, soak, gates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeship.errors import UsageError
from edgeship.fleet import rollout_logic as logic
from edgeship.fleet.rollout_logic import DeviceView, Gates, RolloutView, WaveStats


def view(**changes) -> RolloutView:
    fields = dict(
        state="running",
        current_wave=0,
        wave_count=3,
        soak_s=0.0,
        device_timeout_s=60.0,
        max_per_minute=None,
        require_approval=False,
        wave_done_at=None,
    )
    fields.update(changes)
    return RolloutView(**fields)


def test_waves_parse_as_cumulative_percentages_or_counts():
    assert [w.to_json() for w in logic.parse_waves(["1%", "10%", "50%", "100%"])] == ["1%", "10%", "50%", "100%"]
    assert [w.to_json() for w in logic.parse_waves([2, "10", 50])] == [2, 10, 50]


@pytest.mark.parametrize(
    ("waves", "says"),
    [
        ([], "at least one wave"),
        (["10%", "5%"], "must grow"),
        (["10%", "50%"], "end with 100%"),
        (["ten"], "percentage"),
        ([0], "at least 1"),
    ],
)
def test_bad_waves_are_refused_with_a_reason(waves, says):
    with pytest.raises(UsageError, match=says):
        logic.parse_waves(waves)


def test_every_device_lands_in_exactly_one_wave_and_small_waves_are_not_empty():
    devices = [f"d{i}" for i in range(20)]
    waves = logic.assign_waves(devices, logic.parse_waves(["1%", "10%", "50%", "100%"]), "r1")
    sizes = [sum(1 for w in waves.values() if w == k) for k in range(4)]
    assert sorted(waves) == sorted(devices) and sizes == [1, 1, 8, 10]
    assert waves == logic.assign_waves(
        reversed(devices), logic.parse_waves(["1%", "10%", "50%", "100%"]), "r1"
    )  # stable
    assert waves != logic.assign_waves(devices, logic.parse_waves(["1%", "10%", "50%", "100%"]), "r2")


@given(st.integers(0, 300), st.lists(st.integers(1, 99), min_size=0, max_size=4, unique=True))
def test_wave_assignment_covers_everyone_and_grows(n, cuts):
    specs = logic.parse_waves([f"{c}%" for c in sorted(cuts)] + ["100%"])
    waves = logic.assign_waves([f"d{i}" for i in range(n)], specs, "salt")
    assert len(waves) == n
    reach = [sum(1 for w in waves.values() if w <= k) for k in range(len(specs))]
    assert reach == sorted(reach) and (not n or reach[-1] == n)


def test_selection_by_target_compatibility_and_tags():
    assert logic.matches({"tags": {"site": "a"}}, "jetson-orin-nano", {"site": "a"}, "jetson-orin-nano")
    assert not logic.matches({}, "android-arm64", {}, "jetson-orin-nano")  # a TensorRT package never goes to a phone
    assert logic.matches({}, "jetson-orin-nano", {}, "linux-arm64", compatible=["jetson-orin-nano"])
    assert logic.matches({"tags": {"hw": ["r2", "r3"]}}, "t", {"hw": "r3"}, "t")
    assert not logic.matches({"tags": {"site": "a"}}, "t", {"site": "b"}, "t")
    assert not logic.matches({"tags": {"site": "a"}}, "t", {}, "t")


def test_a_wave_commands_its_pending_devices_respecting_the_rate():
    devices = [DeviceView(f"d{i}", 0, "pending") for i in range(5)] + [DeviceView("later", 1, "pending")]
    decision = logic.decide(view(max_per_minute=3, commanded_last_minute=1), devices, now=100.0)
    assert decision.command == ["d0", "d1"] and not decision.judge_wave


def test_a_stuck_device_times_out_and_does_not_block_the_wave():
    devices = [DeviceView("ok", 0, "COMMITTED"), DeviceView("stuck", 0, "commanded", commanded_at=0.0)]
    decision = logic.decide(view(device_timeout_s=60.0), devices, now=61.0)
    assert decision.time_out == ["stuck"] and decision.mark_wave_done and decision.judge_wave
    assert not logic.decide(view(device_timeout_s=60.0), devices, now=59.0).judge_wave


def test_a_finished_wave_soaks_before_it_is_judged():
    devices = [DeviceView("a", 0, "COMMITTED")]
    first = logic.decide(view(soak_s=30.0), devices, now=100.0)
    assert first.mark_wave_done and not first.judge_wave
    assert not logic.decide(view(soak_s=30.0, wave_done_at=100.0), devices, now=120.0).judge_wave
    assert logic.decide(view(soak_s=30.0, wave_done_at=100.0), devices, now=131.0).judge_wave


def test_paused_and_halted_rollouts_do_nothing():
    devices = [DeviceView("a", 0, "pending")]
    for state in ("paused", "waiting_approval", "halted", "completed", "aborted", "rolled_back"):
        assert logic.decide(view(state=state), devices, now=1.0) == logic.Decision()


def test_after_judgement_moves_on_waits_for_approval_completes_or_halts():
    breach = [logic.Breach("install_failure_rate", 0.5, 0.2)]
    assert logic.after_judgement(view(), []) == ("running", 1)
    assert logic.after_judgement(view(require_approval=True), []) == ("waiting_approval", 0)
    assert logic.after_judgement(view(current_wave=2), []) == ("completed", 2)
    assert logic.after_judgement(view(), breach) == ("halted", 0)


def test_gates_compare_the_wave_with_the_control_group():
    gates = Gates(
        max_install_failure_rate=0.2,
        max_rollback_rate=0.2,
        max_error_rate=0.02,
        max_latency_p99_ratio=2.0,
        max_drift_psi=0.3,
    )
    healthy = WaveStats(
        total=10, committed=10, error_rate=0.011, control_error_rate=0.01, p99_ms=3.0, control_p99_ms=2.0, drift_psi=0.1
    )
    assert logic.judge(gates, healthy) == []
    bad = WaveStats(
        total=10,
        committed=2,
        failed=8,
        error_rate=0.2,
        control_error_rate=0.0,
        p99_ms=9.0,
        control_p99_ms=3.0,
        drift_psi=0.5,
    )
    assert {b.gate for b in logic.judge(gates, bad)} == {
        "install_failure_rate",
        "error_rate_increase",
        "latency_p99_ratio",
        "drift_psi",
    }
    # No data is no breach (a wave of devices without traffic is judged on outcomes only).
    assert logic.judge(gates, WaveStats(total=3, committed=3)) == []


def test_unknown_gates_are_refused_by_name():
    with pytest.raises(UsageError, match="unknown gate 'max_errors'"):
        Gates.from_json({"max_errors": 0.1})


def test_outcome_gates_halt_a_running_wave_once_the_breach_is_certain():
    gates = Gates(max_install_failure_rate=0.2)
    # 2 failures of a 10-device wave: the other 8 may all commit, 2/10 does not breach 0.2 yet.
    assert logic.judge_early(gates, WaveStats(total=10, failed=2), soaking=False) == []
    # 3 of 10: whatever the other 7 do, the final rate is at least 0.3.
    (breach,) = logic.judge_early(gates, WaveStats(total=10, committed=1, failed=3), soaking=False)
    assert breach.gate == "install_failure_rate" and breach.value == pytest.approx(0.75)
    assert (
        logic.judge_early(Gates(max_install_failure_rate=0.2, early_halt=False), WaveStats(10, failed=9), False) == []
    )
    # Too few finished devices to judge a rate at all.
    assert (
        logic.judge_early(Gates(max_rollback_rate=0.0, min_devices_for_rates=3), WaveStats(10, rolled_back=2), False)
        == []
    )


@given(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.sampled_from(["COMMITTED", "FAILED", "ROLLED_BACK", "timed_out"]), min_size=n, max_size=n),
            st.integers(0, n),
        )
    ),
    st.floats(0.0, 1.0),
    st.integers(1, 5),
)
def test_an_early_outcome_breach_is_always_a_breach_of_the_finished_wave(case, threshold, min_devices):
    n, outcomes, known = case
    gates = Gates(max_install_failure_rate=threshold, max_rollback_rate=threshold, min_devices_for_rates=min_devices)

    def stats(states):
        return WaveStats(
            total=n,
            committed=states.count("COMMITTED"),
            failed=states.count("FAILED"),
            rolled_back=states.count("ROLLED_BACK"),
            timed_out=states.count("timed_out"),
        )

    early = {b.gate for b in logic.judge_early(gates, stats(outcomes[:known]), soaking=False)}
    assert early <= {b.gate for b in logic.judge(gates, stats(outcomes))}


def test_telemetry_gates_halt_a_soaking_wave_once_most_of_it_reports():
    gates = Gates(max_latency_p99_ratio=2.0, min_reporting_fraction=0.5)
    slow = dict(total=10, committed=10, p99_ms=30.0, control_p99_ms=6.0)
    assert logic.judge_early(gates, WaveStats(**slow, reporting=4), soaking=True) == []  # 4 of 10 is not most
    (breach,) = logic.judge_early(gates, WaveStats(**slow, reporting=5), soaking=True)
    assert breach.gate == "latency_p99_ratio" and breach.value == pytest.approx(5.0)
    # Telemetry is judged early only in the soak (the wave has finished), never while devices still install.
    assert logic.judge_early(gates, WaveStats(**slow, reporting=10), soaking=False) == []
    healthy = WaveStats(total=10, committed=10, p99_ms=7.0, control_p99_ms=6.0, reporting=10)
    assert logic.judge_early(gates, healthy, soaking=True) == []


def test_a_finished_wave_judges_rates_only_over_enough_devices():
    gates = Gates(max_install_failure_rate=0.2, max_latency_p99_ratio=2.0, min_devices_for_rates=3)
    assert logic.judge(gates, WaveStats(total=2, failed=2)) == []
    assert logic.judge(gates, WaveStats(total=3, committed=1, failed=2))[0].gate == "install_failure_rate"
    few = WaveStats(total=5, committed=5, p99_ms=30.0, control_p99_ms=6.0, reporting=2)
    assert logic.judge(gates, few) == []
    assert logic.judge(gates, WaveStats(**{**few.__dict__, "reporting": 3}))[0].gate == "latency_p99_ratio"


def test_decide_asks_to_watch_a_wave_while_it_runs_or_soaks():
    running = [DeviceView("a", 0, "COMMITTED"), DeviceView("b", 0, "commanded", commanded_at=0.0)]
    assert logic.decide(view(), running, now=1.0).watch
    done = [DeviceView("a", 0, "COMMITTED")]
    assert logic.decide(view(soak_s=30.0), done, now=1.0).watch  # the soak starts
    assert logic.decide(view(soak_s=30.0, wave_done_at=1.0), done, now=20.0).watch
    judged = logic.decide(view(soak_s=30.0, wave_done_at=1.0), done, now=40.0)
    assert judged.judge_wave and not judged.watch
