"""The S3 protocol server the tests use is real: a bucket and an object round-trip over HTTP."""

from __future__ import annotations

import boto3


def test_the_s3_server_stores_and_returns_an_object(aws_env):
    s3 = boto3.client("s3")  # endpoint, keys and region from the standard variables
    s3.create_bucket(Bucket="bqx-probe")
    s3.put_object(Bucket="bqx-probe", Key="a/b.txt", Body=b"minute bars")
    assert s3.get_object(Bucket="bqx-probe", Key="a/b.txt")["Body"].read() == b"minute bars"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="bqx-probe")["Contents"]] == ["a/b.txt"]
