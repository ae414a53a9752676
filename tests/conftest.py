import os

# Nothing may come from a model hub at test time (everything runs offline: README.md#quick-start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Inductor's on-disk caches key compiled graphs on the captured graph, not on the Python code of qcompile's
# inductor decompositions (qcompile.lowering.cpu): code compiled by an earlier version of them could be served
# again. Each test session compiles into its own cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qcompile-tests-inductor-")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest attaches its log-capture handler to every non-propagating logger. torch's structured-trace logger
# ("torch.__trace", non-propagating, used for TORCH_TRACE) then looks recorded, and torch renders every graph
# and guard for it: export and compile take about twice as long. Letting it propagate keeps pytest's handlers
# off it (trace_structured only checks the logger's own handlers), so nothing is rendered, as outside pytest.
logging.getLogger("torch.__trace").propagate = True


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts and ends with an empty dynamo cache, so compiles never leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

