"""No peer fetches bitsandbytes' CPU kernel from the Hugging Face hub when it imports bitsandbytes
(``runtime/hub_kernels.py``): peft imports it where it is installed, at ``import peft`` before 0.22 and when it wraps a
model from 0.22 on.

In a child process, the hub client bitsandbytes asks (``kernels.get_kernel``) records every request instead of
downloading; a peer's imports must make none."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
bitsandbytes = pytest.importorskip("bitsandbytes")

RECORDING = """
import os
import kernels

def record(repository, *args, **kwargs):
    with open(os.environ["KERNEL_REQUESTS"], "a") as f:
        f.write(repository + "\\n")
    raise RuntimeError("no hub in this test")

kernels.get_kernel = record
"""


def _kernel_requests(tmp_path, imports: str) -> list[str]:
    """The hub kernels a fresh process asks for while it runs ``imports``."""
    requests = tmp_path / "requests.txt"
    requests.unlink(missing_ok=True)
    env = {**os.environ, "KERNEL_REQUESTS": str(requests)}
    subprocess.run([sys.executable, "-c", RECORDING + imports], env=env, check=True, timeout=120)
    return requests.read_text().split() if requests.exists() else []


def test_a_peer_imports_bitsandbytes_without_asking_the_hub_for_a_kernel(tmp_path):
    assert _kernel_requests(tmp_path, "import potluck.peer, peft, bitsandbytes") == []
    assert _kernel_requests(tmp_path, "import potluck.tools, peft, bitsandbytes") == []


def test_without_the_guard_bitsandbytes_asks_the_hub_on_this_cpu(tmp_path):
    """What the guard prevents, where it happens: on CPUs with AVX512-BF16."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes asks the hub for a kernel only on CPUs with AVX512-BF16")
    assert _kernel_requests(tmp_path, "import bitsandbytes") == [
        "kernels-community/quantization-bitsandbytes"
    ]
