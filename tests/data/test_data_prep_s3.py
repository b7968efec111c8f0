"""prepare_dataset reading `s3://` through s3fs from a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kimi_core.data import DataValidationError, prepare_dataset, read_prepared

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
ROWS = [
    {"prompt": [{"role": "user", "content": "What is 1+1?"}], "label": "2"},
    {"prompt": [{"role": "user", "content": "What is 2+3?"}], "label": "5"},
    {"prompt": [{"role": "user", "content": "What is 1+1?"}], "label": "2"},
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint, not a patched client)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **CREDENTIALS)
    client.create_bucket(Bucket="kimi-data")
    body = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    client.put_object(Bucket="kimi-data", Key="sets/small.jsonl", Body=body)
    client.put_object(Bucket="kimi-data", Key="sets/bad.jsonl", Body=body + b'{"prompt": "x"}\n')
    return "kimi-data"


def _storage_options(endpoint: str) -> dict:
    return {
        "key": CREDENTIALS["aws_access_key_id"], "secret": CREDENTIALS["aws_secret_access_key"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


def test_prepare_from_s3(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    options = _storage_options(s3_endpoint)
    result = prepare_dataset(f"s3://{bucket}/sets/small.jsonl", out_dir=tmp_path, name="small",
                             storage_options=options)
    assert (result.rows_in, result.rows_out, result.duplicates) == (3, 2, 1)
    assert read_prepared(result.path) == ROWS[:2]
    stats = json.loads(Path(result.stats_path).read_text())
    assert "secret" not in json.dumps(stats) and "testing" not in json.dumps(stats)  # no credentials
    again = prepare_dataset(f"s3://{bucket}/sets/small.jsonl", out_dir=tmp_path, name="small",
                            storage_options=options)
    assert again.cached


def test_s3_bad_row_names_the_url(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"s3://kimi-data/sets/bad.jsonl:4: missing key 'label'"):
        prepare_dataset(f"s3://{bucket}/sets/bad.jsonl", out_dir=tmp_path, name="bad",
                        storage_options=_storage_options(s3_endpoint))


def test_s3_missing_object(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data source not found: s3://kimi-data/sets/none.jsonl"):
        prepare_dataset(f"s3://{bucket}/sets/none.jsonl", out_dir=tmp_path, name="none",
                        storage_options=_storage_options(s3_endpoint))
