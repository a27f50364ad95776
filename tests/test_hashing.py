"""cmdeploy.hashing.file_sha256: the one file hash every module uses (torch-free)."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from cmdeploy.hashing import file_sha256


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=300), chunk=st.integers(1, 64))
def test_matches_hashlib_for_any_chunking(tmp_path_factory, data: bytes, chunk: int) -> None:
    p = tmp_path_factory.mktemp("h") / "f.bin"
    p.write_bytes(data)
    assert file_sha256(p, chunk_bytes=chunk) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(p)) == hashlib.sha256(data).hexdigest()


def test_modules_share_the_one_implementation() -> None:
    from cmdeploy import engine_sidecar, segmenter
    from cmdeploy.writers import report

    assert engine_sidecar.file_sha256 is segmenter.file_sha256 is report.file_sha256 is file_sha256
