import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_teacher():
    """The random-init tiny teacher, built once per session."""
    from zeroseg.pipeline.teacher import load_teacher

    return load_teacher("zeroseg-tiny", "random", seed=0)
