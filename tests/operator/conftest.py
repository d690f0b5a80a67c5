from pathlib import Path

import pytest
import pytest_asyncio

from support.cluster import Cluster


@pytest.fixture(scope="session")
def kompressor_cache(tmp_path_factory):
    """One KOMPRESSOR_CACHE for the session: the builtin model is trained once."""
    import os

    return Path(os.environ.get("KOMPRESSOR_CACHE") or tmp_path_factory.mktemp("kompressor-cache"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory, kompressor_cache):
    async with Cluster(tmp_path_factory.mktemp("cluster"), cache=kompressor_cache) as c:
        yield c
