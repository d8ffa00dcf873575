import pytest

from tests.distributed.spawning import JobBatch


@pytest.fixture(scope="session")
def jobs(request, tmp_path_factory):
    """One :class:`JobBatch` with the jobs of every collected module that defines
    ``add_jobs(batch)`` (those whose tests were selected: a single test still runs its
    module's jobs, ~1 s each, in the one start)."""
    batch = JobBatch(tmp_path_factory.mktemp("spawned"))
    modules = dict.fromkeys(getattr(item, "module", None) for item in request.session.items)
    for module in modules:
        add = getattr(module, "add_jobs", None)
        if add is not None:
            add(batch)
    return batch
