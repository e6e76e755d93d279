"""The registry gate's conditions, deployed speed among them: which pass, which fail, and what they say."""

from __future__ import annotations

from pathlib import Path

from detkd.models.cost import ModelCost
from detkd.serving.speed import SpeedReport
from detkd.tracking.registry import Candidate, Gate, GateVerdict, check_gate, version_tags


def measured(speedup: float, latency_ms: float, *, threads: int = 1) -> SpeedReport:
    return SpeedReport(
        speedup=speedup,
        latency_ms=latency_ms,
        reference_latency_ms=speedup * latency_ms,
        speedup_spread=0.02,
        reference="teacher",
        turns=5,
        calls=20,
        threads=threads,
        machine="node-1 (2 CPUs, x86_64)",
    )


def candidate(ap: float = 0.6, speed: SpeedReport | None = None, unavailable: str = "") -> Candidate:
    return Candidate("s", "run", Path("s.pt"), ap, "test", "digest", speed=speed, speed_unavailable=unavailable)


def test_speed_floors_pass_and_fail_with_their_reasons() -> None:
    fast = candidate(speed=measured(3.12, 2.41))
    assert check_gate(fast, None, Gate(min_speedup=3.0, max_latency_ms=2.5)).passed
    assert check_gate(fast, None, Gate()).passed  # no speed floor: the speed is recorded, not judged

    slow = candidate(speed=measured(2.41, 4.1))
    verdict = check_gate(slow, None, Gate(min_speedup=3.0, max_latency_ms=3))
    assert not verdict.passed
    assert verdict.reasons == [
        "speedup 2.41x < floor 3x against teacher (onnxruntime, 1 thread)",
        "latency 4.10 ms/image > ceiling 3 ms (onnxruntime, 1 thread, on node-1 (2 CPUs, x86_64))",
    ]
    assert verdict.numbers["min_speedup"] == 3.0 and verdict.numbers["max_latency_ms"] == 3
    assert "images_per_s" not in verdict.numbers  # the evaluation's eager throughput is not a gate number
    threads = check_gate(candidate(speed=measured(1.0, 9.0, threads=4)), None, Gate(min_speedup=2))
    assert threads.reasons == ["speedup 1.00x < floor 2x against teacher (onnxruntime, 4 threads)"]
    # AP and speed fail together: every failed condition is a reason
    both = check_gate(candidate(ap=0.1, speed=measured(1.0, 9.0)), None, Gate(min_ap=0.5, min_speedup=2))
    assert len(both.reasons) == 2 and both.reasons[0] == "AP 0.1000 < floor 0.5"


def test_a_speed_floor_without_a_measurement_fails() -> None:
    why = "the reference teacher: MMDetection models are not exported"
    for gate in (Gate(min_speedup=1.5), Gate(max_latency_ms=100.0)):
        verdict = check_gate(candidate(unavailable=why), None, gate)
        assert verdict.reasons == [f"deployed speed not measured, so the speed floor cannot pass ({why})"]
    assert check_gate(candidate(), None, Gate(min_speedup=1.5)).reasons == [
        "deployed speed not measured, so the speed floor cannot pass (no measurement was given)"
    ]
    assert check_gate(candidate(unavailable=why), None, Gate()).passed  # nothing asked of the speed


def test_version_tags_carry_the_speed_its_reference_machine_and_cost() -> None:
    chosen = candidate(speed=measured(3.12, 2.41))
    chosen.cost = ModelCost(mflops=412.345, params=1234567, input_px=64)
    tags = version_tags(chosen, check_gate(chosen, None, Gate(min_speedup=3.0)), None)
    assert tags["detkd.speed.speedup"] == "3.12" and tags["detkd.speed.latency_ms"] == "2.41"
    assert tags["detkd.speed.images_per_s"] == str(round(1000 / 2.41, 2))
    assert float(tags["detkd.speed.reference_latency_ms"]) == round(3.12 * 2.41, 4)
    assert tags["detkd.speed.speedup_spread"] == "0.02"
    assert tags["detkd.speed.reference"] == "teacher" and tags["detkd.speed.machine"] == "node-1 (2 CPUs, x86_64)"
    assert tags["detkd.speed.backend"].startswith("onnxruntime ") and "1 thread(s)" in tags["detkd.speed.backend"]
    assert tags["detkd.speed.turns"] == "5 x 20 calls"
    assert (tags["detkd.cost.mflops"], tags["detkd.cost.params"]) == ("412.345", "1234567")
    assert (tags["detkd.gate.min_speedup"], tags["detkd.gate.max_latency_ms"]) == ("3.0", "None")
    assert tags["detkd.gate.passed"] == "true" and "detkd.images_per_s" not in tags
    unmeasured = version_tags(candidate(unavailable="no reference"), GateVerdict(True, [], {}), None)
    assert unmeasured["detkd.speed.unavailable"] == "no reference"
    assert not any(k.startswith(("detkd.speed.speedup", "detkd.cost.")) for k in unmeasured)
