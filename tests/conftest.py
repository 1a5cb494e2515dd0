import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).parent / "fixtures"

# One fixed profile: derandomized so CI runs are reproducible; "dev" explores with fresh seeds.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


TEXT = """\
ROMEO: But soft, what light through yonder window breaks?
It is the east, and Juliet is the sun.
JULIET: O Romeo, Romeo, wherefore art thou Romeo?
Deny thy father and refuse thy name.
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small folder of shuffled Shakespeare lines, the pre-training tests' corpus."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    lines = TEXT.splitlines()
    for i in range(40):
        (d / f"doc{i}.txt").write_text("\n".join(rng.permutation(lines)) + "\n")
    return d
