"""The Data page: the validation report of a file with bad lines, and of a Parquet upload."""

from __future__ import annotations

import json

import pytest

from ui_support import EXAMPLE, logged_in, ui_server


@pytest.fixture
def client_of(tmp_path):
    with ui_server(tmp_path / "ws") as server:
        client, token = logged_in(server)
        yield server, client, token
        client.close()


def test_bad_lines_are_listed_with_their_line_numbers(client_of):
    server, client, _ = client_of
    good = EXAMPLE.read_text().splitlines()[:3]
    (server.workspace / "bad.jsonl").write_text(
        "\n".join([good[0], "{not json", good[1], '{"foo": 1}', good[2]]) + "\n"
    )
    page = client.get("/data", params={"file": "bad.jsonl", "model": "tiny-llama"}).text
    assert "not usable as is" in page and "INPUT_DATASET_PARSE_FAILED" in page
    assert 'id="bad-lines"' in page and "bad.jsonl:2" in page and "bad.jsonl:4" in page
    assert '<td id="rows-read">5</td>' in page and '<td id="rows-valid">3</td>' in page


def test_a_parquet_upload_is_validated_like_jsonl(client_of):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    server, client, token = client_of
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines() if '"messages"' in line][:8]
    path = server.workspace.parent / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in rows]), path)
    res = client.post(
        "/data/upload",
        data={"csrf": token},
        files={"file": ("rows.parquet", path.read_bytes())},
        headers={"Origin": server.url},
        follow_redirects=True,
    )
    assert res.status_code == 200 and "ready to train" in res.text
    assert f'<td id="rows-valid">{len(rows)}</td>' in res.text and 'class="trained"' in res.text


def test_an_unknown_model_is_a_coded_error_on_the_page(client_of):
    _, client, _ = client_of
    params = {"file": "chat.jsonl", "model": "no-such/model-anywhere"}
    page = client.get("/data", params=params, headers={"Accept": "text/html"})
    assert page.status_code == 400 and "<b>[CONFIG_UNKNOWN_MODEL]</b>" in page.text and "Traceback" not in page.text
    script = client.get("/data", params=params, headers={"Accept": "application/json"})
    assert script.json()["error"]["code"] == "CONFIG_UNKNOWN_MODEL"
