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


def test_decode_tasks_hand_on_exactly_the_declared_columns():
    """``contracts.DECODED_COLUMNS`` is what the model actor reads: the decode stage must produce it."""
    import io

    from PIL import Image

    from ngt_ray.job.contracts import DECODED_COLUMNS
    from ngt_ray.job.stages import decode_batch

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, "JPEG")
    batch = {"uri": np.array(["a.jpg", "b.jpg", "c.jpg"], dtype=object),
             "bytes": np.array([buf.getvalue(), b"", b"junk"], dtype=object),
             "error": np.array(["", "", "read failed: gone"], dtype=object),
             "error_kind": np.array(["", "", "read"], dtype=object)}
    out = decode_batch(batch, 64)
    assert set(out) == set(DECODED_COLUMNS)
    assert out["pixels"].shape == (3, 64, 64, 3) and out["pixels"].dtype == np.uint8
    assert list(out["error"]) == ["", "empty object", "read failed: gone"]  # the reader's reason wins
    assert list(out["error_kind"]) == ["", "decode", "read"]
