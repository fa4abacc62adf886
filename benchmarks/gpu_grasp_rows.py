"""GRASP kernel vs reference, row by row, on the GPU: which rows choose other blocks, and how.

The inputs of tests/test_kernels_grasp.py::test_batched_equals_rows (B 4, N 16, h 24, C 40,
L 3, k 5), once with the tests' pinned tiny config and once autotuned. For each selector and
row it prints the prompt's relative error against the CUDA reference and against the CPU one,
and on a mismatch the three weight vectors and the scores. Exit status 1 on any mismatch.
On an H200 (2026-12-04) the kernel before the score round trip failed 1-4 rows of 16:
benchmarks/results/gpu-h200.md.

    python benchmarks/gpu_grasp_rows.py        # needs a CUDA GPU and Triton
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels_grasp import make_inputs, run_triton  # noqa: E402  (the tests' inputs and NaN-poisoned run)

from fusar_edge.kernels import grasp as G  # noqa: E402
from fusar_edge.kernels import grasp_fuse_reference  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_grasp_rows.py: no CUDA GPU visible", file=sys.stderr)
        return 2
    torch.set_printoptions(precision=5, linewidth=200)
    q, keys, prompts = make_inputs(4, 16, 24, 40, 3, torch.float32, seed=9)
    bad = 0
    for pinned in (True, False):
        G.FIXED_CONFIG = dict(G._INTERPRET_META) if pinned else None
        for sel in ("topk", "entmax15"):
            for i in range(4):
                pi, wi = run_triton(q[i], keys[i], prompts, sel, 5)
                rp, rw = grasp_fuse_reference(q[i], keys[i], prompts, sel, 5)
                cp, cw = grasp_fuse_reference(q[i].cpu(), keys[i].cpu(), prompts.cpu(), sel, 5)
                err = float((pi - rp).norm() / rp.norm())
                err_cpu = float((pi.cpu() - cp).norm() / cp.norm())
                print(f"{'pinned' if pinned else 'autotuned'} {sel} row {i}: prompt rel. error {err:.2e} "
                      f"(vs the CPU reference {err_cpu:.2e}), weights max diff {float((wi - rw).abs().max()):.2e}")
                if err > 1e-5:
                    bad += 1
                    print("  weights, kernel   ", wi.cpu())
                    print("  weights, reference", rw.cpu())
                    print("  weights, CPU      ", cw)
                    print("  scores            ", (keys[i] @ q[i] / 24 ** 0.5).cpu())
    print(f"{bad} of 16 rows differ" if bad else "every row matches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
