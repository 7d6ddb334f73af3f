"""`encinfer keys put|get|ls|rm|stat` against a running key store."""
from __future__ import annotations

import hashlib
import json

import pytest
from conftest import fake_inspect, fake_key

from encinfer.cli import main


@pytest.fixture
def ks(keystore_factory):
    return keystore_factory("fs", tokens="alice-t=alice:tenant", inspect=fake_inspect)


@pytest.fixture
def keys(ks, capsys):
    """keys("put", "file") -> (exit code, stdout, stderr) of `encinfer keys ...` as alice."""
    def run(*argv: str):
        capsys.readouterr()
        code = main(["keys", argv[0], "--target", ks.target, "--token", "alice-t", *argv[1:]])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_put_prints_the_key_id(keys, tmp_path):
    data = fake_key(3000)
    (tmp_path / "k.bin").write_bytes(data)
    code, out, _ = keys("put", str(tmp_path / "k.bin"), "--label", "model=mnist")
    assert code == 0 and out.strip() == hashlib.sha256(data).hexdigest()


def test_stat_prints_the_record_as_json(keys, tmp_path):
    (tmp_path / "k.bin").write_bytes(fake_key())
    kid = keys("put", str(tmp_path / "k.bin"), "--label", "model=mnist", "--ttl", "600")[1].strip()
    code, out, _ = keys("stat", kid)
    record = json.loads(out)
    assert code == 0 and record["key_id"] == kid and record["labels"] == {"model": "mnist"}
    assert record["parameters"]["poly_modulus_degree"] == 4096


def test_get_writes_the_key_to_a_file(keys, tmp_path):
    data = fake_key(2_500_000)
    (tmp_path / "k.bin").write_bytes(data)
    kid = keys("put", str(tmp_path / "k.bin"))[1].strip()
    code, _, _ = keys("get", kid, "-o", str(tmp_path / "copy.bin"))
    assert code == 0 and (tmp_path / "copy.bin").read_bytes() == data


def test_ls_lists_one_line_per_key(keys, tmp_path):
    ids = set()
    for i in range(3):
        (tmp_path / f"k{i}.bin").write_bytes(fake_key())
        ids.add(keys("put", str(tmp_path / f"k{i}.bin"))[1].strip())
    code, out, _ = keys("ls")
    assert code == 0 and {line.split("\t")[0] for line in out.splitlines()} == ids


def test_rm_deletes_and_stat_then_fails(keys, tmp_path):
    (tmp_path / "k.bin").write_bytes(fake_key())
    kid = keys("put", str(tmp_path / "k.bin"))[1].strip()
    assert keys("rm", kid)[0] == 0
    code, _, err = keys("stat", kid)
    assert code == 1 and "NOT_FOUND" in err


def test_errors_are_one_line_with_the_status_and_exit_1(keys, tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a key bundle")
    code, out, err = keys("put", str(tmp_path / "junk.bin"))
    assert code == 1 and out == "" and err.startswith("error: INVALID_ARGUMENT:")


def test_a_wrong_token_is_reported_as_unauthenticated(ks, capsys):
    code = main(["keys", "ls", "--target", ks.target, "--token", "nope"])
    assert code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err


def test_a_missing_file_is_a_clear_error(keys, tmp_path):
    code, _, err = keys("put", str(tmp_path / "absent.bin"))
    assert code == 1 and "absent.bin" in err
