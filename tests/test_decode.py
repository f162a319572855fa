"""Decoding: errors are values, never exceptions."""

from __future__ import annotations

import numpy as np

from ngt_ray.nets.decode import decode_image


def test_decode_errors_are_values_not_exceptions(caltech):
    jpg = next((caltech / "train" / "revolver").glob("*.jpg")).read_bytes()
    arr, err = decode_image(jpg, 224)
    assert err is None and arr.shape == (3, 224, 224) and arr.dtype == np.uint8 and arr.std() > 0
    for bad in (b"", jpg[:200], b"GIF89a" + b"\0" * 20, b"plain text"):
        arr, err = decode_image(bad, 224)
        assert arr is None and err
