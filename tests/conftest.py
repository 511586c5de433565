import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(5678), 10_000))
    return lambda: next(keys)
