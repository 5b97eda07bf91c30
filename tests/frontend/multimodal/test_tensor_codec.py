"""`base64(torch.save(tensor))` read without torch: values, shapes, strides and dtypes equal torch's own load;
anything but one plain tensor (another global in the pickle, a cut archive, too many values) is refused."""
from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from frontend.multimodal.tensor_codec import TensorDecodeError, load_saved_tensor


def _saved(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("tensor", [
    torch.randn(16, 64),
    torch.randn(1, 5, 8),
    torch.randn(6, 4).t(),  # a transposed (non-contiguous) view
    torch.randn(10, 6)[2:7, 1:4],  # a view with an offset into its storage
    torch.randn(3, 8).to(torch.bfloat16),
    torch.randn(3, 8).to(torch.float16),
    torch.tensor([[1, 4, 6]]),
], ids=["2d", "3d", "transposed", "offset-view", "bfloat16", "float16", "int64"])
def test_saved_tensors_load_as_torch_loads_them(tensor: torch.Tensor) -> None:
    loaded = load_saved_tensor(_saved(tensor), max_values=10**6)
    expected = torch.load(io.BytesIO(_saved(tensor)), weights_only=True)
    assert loaded.shape == tuple(expected.shape)
    assert np.array_equal(loaded, expected.float().numpy() if expected.is_floating_point() else expected.numpy())


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, ("echo pwned",)


def test_anything_but_a_plain_tensor_is_refused() -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as files:
        files.writestr("archive/data.pkl", pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(TensorDecodeError, match="posix.system|os.system|only a plain saved tensor"):
        load_saved_tensor(archive.getvalue(), max_values=100)
    with pytest.raises(TensorDecodeError, match="not a tensor"):
        load_saved_tensor(b"definitely not a zip", max_values=100)
    with pytest.raises(TensorDecodeError, match="more than"):
        load_saved_tensor(_saved(torch.zeros(20, 20)), max_values=100)
    data = _saved(torch.zeros(4, 4))
    with pytest.raises(TensorDecodeError):
        load_saved_tensor(data[: len(data) // 2], max_values=100)
