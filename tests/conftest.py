import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(5678), 10_000))
    return lambda: next(keys)


# Every compiled XLA:CPU executable maps memory regions (about three for a
# small `jax.jit`, about 22 for a `fixed_point` solve), and a pytest worker
# keeps thousands of executables alive in JAX's caches. Past the
# kernel's `vm.max_map_count` (65530 by default) a new mapping fails and XLA
# segfaults while compiling (seen in CI as "worker 'gw1' crashed"; a worker had
# 13,000 regions a third of the way through three test files). Clearing the
# caches once a worker holds many keeps it far below the limit; tests that
# share compiled functions recompile only after such a clear.
_MAX_REGIONS = 30_000


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_executables():
    yield
    if _mapped_regions() > _MAX_REGIONS:
        jax.clear_caches()
