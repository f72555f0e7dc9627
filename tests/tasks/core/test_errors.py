"""What leaves a stage: an error keeps its type and its fix, and loses every secret a URL in it carried."""

from __future__ import annotations

import errno

import pytest

from ptqflow.tasks.core.errors import InvalidDataset, secrets_kept_out

SIGNED = "https://bucket.s3.amazonaws.com/d/x.parquet?X-Amz-Credential=AKID&X-Amz-Signature=c2VjcmV0"


def test_an_error_quoting_a_signed_url_leaves_with_its_type_and_fix_but_not_the_signature():
    @secrets_kept_out()
    def stage() -> None:
        try:
            raise OSError(errno.EIO, "I/O error", SIGNED)
        except OSError as cause:
            raise InvalidDataset(f"{SIGNED} is not Parquet: point --dataset at a Parquet file") from cause

    with pytest.raises(InvalidDataset) as error:
        stage()
    text = str(error.value)
    assert text == "https://bucket.s3.amazonaws.com/d/x.parquet is not Parquet: point --dataset at a Parquet file"
    assert "c2VjcmV0" not in str(error.value.__cause__) and error.value.__cause__.errno == errno.EIO


@pytest.mark.parametrize(
    "url", ["s3://user:hunter2@bucket/x", "https://host/x?apikey=hunter2", "https://host/x#token=hunter2"]
)
def test_passwords_and_any_query_or_fragment_are_taken_out(url):
    with pytest.raises(FileNotFoundError) as error, secrets_kept_out():
        raise FileNotFoundError(errno.ENOENT, "No such file", url)
    assert "hunter2" not in str(error.value) and error.value.errno == errno.ENOENT


def test_an_error_whose_message_is_made_otherwise_is_replaced_naming_its_type():
    class Stubborn(Exception):
        def __str__(self) -> str:
            return f"cannot read {SIGNED}"

    with pytest.raises(RuntimeError, match=r"^Stubborn: cannot read https://bucket\.s3\.amazonaws\.com/d/x\.parquet$"):
        with secrets_kept_out():
            raise Stubborn()


def test_an_error_without_secrets_is_the_very_same_object():
    original = ValueError("https://example.org/data.parquet is empty")
    with pytest.raises(ValueError) as error, secrets_kept_out():
        raise original
    assert error.value is original and str(original) == "https://example.org/data.parquet is empty"
