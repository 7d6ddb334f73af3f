"""`make bench --quick` as a smoke test: every row has every field, encinfer agrees with plaintext."""
import json

from bench import run

FIELDS = ("system", "layout", "client_encrypt_ms_per_image", "server_ms_per_image", "client_decrypt_ms_per_image",
          "e2e_ms_per_image", "bytes_up_per_image", "bytes_down_per_image", "key_bytes", "agreement", "accuracy",
          "n_images")


def test_quick_bench_writes_every_field_and_encinfer_agrees_with_plaintext(tmp_path):
    out = tmp_path / "results.json"
    assert run.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["system"], r["layout"]) for r in rows} >= {("encinfer", "coeff"), ("encinfer", "batch")}
    for row in rows:
        assert set(FIELDS) <= set(row), row
    for row in rows:
        if row["system"] == "encinfer":
            assert row["agreement"] == 1.0
            assert row["n_images"] > 0 and row["server_ms_per_image"] > 0
