"""SIGKILL at every OTA transition and at random points of download and unpack: never a bricked device.

CI runs the bounded version below (>= 200 kills across the tests of this module) once, on Python 3.10,
the device's Python (``py310_only``: the 3.11 run, make unit, deselects it; it is about 5.5 minutes of
that run's 2 workers). ``python -m benchmarks.ota_crash`` runs 1,000 and prints the tally.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from tests.device_agent.crash_harness import TRANSITION_POINTS, Rig, random_kills, transition_kill

pytestmark = [pytest.mark.slow, pytest.mark.py310, pytest.mark.py310_only]

# Random kills per test in CI; 4 tests x 2 phases. Set EDGESHIP_CRASH_KILLS for a longer local run.
RANDOM_KILLS = int(os.environ.get("EDGESHIP_CRASH_KILLS", "22"))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, publisher_files) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("crash"), publisher_files.key_path, publisher_files.pub_path)
    yield rig
    rig.close()


CASES = [(kind, point) for kind, points in TRANSITION_POINTS.items() for point in points]


@pytest.mark.parametrize(("kind", "point"), CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_kill_at_a_transition_comes_back_serving_and_converges(rig, kind, point):
    result = transition_kill(rig, kind, point)
    assert result.kills == 1 and not result.problems, result


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("phase", ["download", "unpack"])
def test_random_kills_during_download_and_unpack_never_brick(rig, phase, seed):
    rng = random.Random(f"{phase}-{seed}")
    total, results = 0, []
    while total < RANDOM_KILLS:
        result = random_kills(rig, RANDOM_KILLS - total, rng, phase=phase)
        results.append(result)
        assert not result.problems, result
        total += result.kills
        assert len(results) < 40, "kills do not land: " + repr(results[-3:])
    assert total >= RANDOM_KILLS
