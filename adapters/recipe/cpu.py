"""What the recipe's arithmetic depends on besides its inputs, pinned so that one recipe gives the same bytes on
every x86-64 machine with AVX2.

torch picks its CPU kernels by instruction set when it loads: ATen's own vectorised kernels, MKL's BLAS (every
matmul) and oneDNN. AVX-512 kernels sum in another order than AVX2 ones, so an unpinned build on an AVX-512
machine trained other weights (crm-formatter@4 measured 6.3 % invalid on the golden set instead of 2.0 %, and the
route's 3 % release gate refused it). Each library reads its pin from the environment once, when it loads, so
`pin` runs before anything imports torch; the thread count is pinned too (a reduction's order depends on it).
`capability` reports what torch actually runs after import, for the build record and for `check`.

Only the standard library here: `build.py` imports this before torch.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

ISA = "AVX2"


def pins(threads: int) -> dict[str, str]:
    """The environment the recipe's process runs with."""
    return {
        "ATEN_CPU_CAPABILITY": ISA.lower(),  # ATen's kernels: reductions, softmax, element-wise ops
        "MKL_CBWR": ISA,  # MKL's conditional numerical reproducibility: the AVX2 code branch on any CPU
        "ONEDNN_MAX_CPU_ISA": ISA,  # oneDNN (torch's mkldnn) primitives
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "MKL_DYNAMIC": "FALSE",  # MKL may otherwise use fewer threads than asked, and sum in another order
    }


def pin(environ: MutableMapping[str, str], threads: int) -> None:
    """Set the pins in `environ` (os.environ: setting it also sets the C environment the libraries read)."""
    environ.update(pins(threads))


def capability(torch: Any) -> str:
    """The instruction set torch's kernels run with (after `pin`, "AVX2" on a machine that has it)."""
    return str(torch.backends.cpu.get_cpu_capability())


def check(torch: Any) -> str | None:
    """Why this build cannot reproduce the recorded weights, or None when the pins took."""
    found = capability(torch)
    if found != ISA:
        return (
            f"torch runs {found} kernels, not {ISA}: this machine lacks {ISA} or the pins were not applied before "
            f"torch loaded; the build's weights will not match the recorded ones (adapters/recipe/weights.json)"
        )
    return None
