import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_teacher():
    """The random-init tiny teacher, built once per session."""
    from zeroseg.pipeline.teacher import load_teacher

    return load_teacher("zeroseg-tiny", "random", seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds): 2 CPUs, small store."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The whole offline loop at its smallest (`zeroseg demo --preset tiny`), run once: its out
    dir (store, scenes, runs) and summary serve the demo, segment and ablation tests."""
    from zeroseg.experiments.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZEROSEG_CACHE", str(root / "cache"))
    summary = run_demo(root / "out", "tiny")
    yield root / "out", summary
    mp.undo()
