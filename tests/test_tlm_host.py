"""The ONNX Runtime backend's numpy TLM matrix against the torch definition (kernels.tlm)."""

import numpy as np
import pytest
import torch

from fusar_edge.backends.tlm_host import bilinear_matrix, tlm_weights_numpy
from fusar_edge.errors import AnchorError
from fusar_edge.kernels.tlm import tlm_weights


@pytest.mark.parametrize("patch_grid,token_grid,s,sigma", [
    ((16, 16), (8, 8), 256, 1.5),  # the demo: 224 px chip, 16 x 16 anchors
    ((12, 12), (6, 6), 9, 2.0),
    ((36, 36), (18, 18), 64, 3.0),  # 504 px chip, as the reference runs
    ((10, 14), (5, 7), 5, 0.7),  # not square
    ((8, 8), (8, 8), 3, 1.0),  # no resize
    ((6, 9), (12, 5), 7, 1.2),  # up along one axis, down along the other
])
def test_numpy_tlm_weights_match_torch(patch_grid, token_grid, s, sigma):
    rng = np.random.default_rng(sum(patch_grid) * 31 + s)
    for _ in range(3):
        positions = rng.random((s, 2)).astype(np.float32)
        mask = rng.random(s) > 0.3
        mask[rng.integers(s)] = True
        ref = tlm_weights(torch.from_numpy(positions), torch.from_numpy(mask), patch_grid, token_grid, sigma).numpy()
        got = tlm_weights_numpy(positions, mask, patch_grid, token_grid, sigma)
        assert got.shape == ref.shape == (token_grid[0] * token_grid[1], s) and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
        assert not got[:, ~mask].any()  # masked anchors: zero columns


def test_bilinear_matrix_is_torch_interpolate():
    rng = np.random.default_rng(0)
    for n_in, n_out in ((16, 8), (7, 3), (5, 11), (4, 4), (1, 3)):
        x = rng.random((2, n_in))
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=n_out, mode="linear",
                                              align_corners=False)[0].numpy()
        assert np.allclose(x @ bilinear_matrix(n_in, n_out).T, ref, atol=1e-12)


def test_numpy_tlm_weights_refuse_all_masked_and_bad_shapes():
    p = np.random.default_rng(1).random((4, 2))
    with pytest.raises(AnchorError, match="every anchor is masked"):
        tlm_weights_numpy(p, np.zeros(4, bool), (8, 8), (4, 4), 2.0)
    with pytest.raises(Exception, match="positions: expected"):
        tlm_weights_numpy(p[:, :1], np.ones(4, bool), (8, 8), (4, 4), 2.0)
    with pytest.raises(Exception, match="mask: expected"):
        tlm_weights_numpy(p, np.ones(3, bool), (8, 8), (4, 4), 2.0)
