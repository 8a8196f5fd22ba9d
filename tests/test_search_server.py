"""search.py --serve: the API through FastAPI's test client (status codes, limits, traversal attempts,
bad queries), read-only records, and a server that picks up index.py's updates without a restart."""

import os
import sqlite3
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import index  # noqa: E402
from photo_library import searcher as searcher_module  # noqa: E402
from photo_library import server  # noqa: E402
from photo_library.searcher import Searcher  # noqa: E402
from photo_library.searcher import encode_alone  # noqa: E402
from photo_library.store import Library  # noqa: E402
from photo_world import TOY_DIM, checkpoint, make_world  # noqa: E402

QUERY = "a dog next to a bench and a kite"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), seeds=(0,))


@pytest.fixture(scope="module")
def client(world, tmp_path_factory):
    lib = str(tmp_path_factory.mktemp("served") / "lib")
    assert (
        index.main(
            ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows, "--library", lib]
        )
        == 0
    )
    searcher = Searcher(lib)
    return TestClient(server.create_app(searcher), raise_server_exceptions=False), searcher


def test_search_answers_json_with_links_by_id_only(client):
    api, searcher = client
    answer = api.get("/api/search", params={"q": QUERY, "k": 5}).json()
    assert (
        answer["query"] == QUERY and answer["photos"] == 18 and answer["unknown_words"] == [] and not answer["reranked"]
    )
    expected, _ = searcher.text(QUERY, k=5)
    assert [hit["id"] for hit in answer["results"]] == [hit["id"] for hit in expected]
    assert [hit["score"] for hit in answer["results"]] == [hit["score"] for hit in expected]
    for hit in answer["results"]:
        assert "path" not in hit and all(
            hit[key] == f"/api/photos/{hit['id']}/{key}" for key in ("thumbnail", "map", "view", "file")
        )
    notice = api.get("/api/search", params={"q": "a dog and a kayak"}).json()
    assert (
        notice["unknown_words"] == ["kayak"] and notice["notice"] == "'kayak' is not in the vocabulary: read as <unk>"
    )


def test_photos_and_their_pictures(client, world):
    api, _ = client
    photo = api.get("/api/photos/1").json()
    assert set(photo) == {"id", "name", "width", "height", "boxes", "objects"} and len(photo["boxes"]) == 36
    assert {name for name in photo["objects"]} <= {
        "dog",
        "cat",
        "horse",
        "bird",
        "cow",
        "sheep",
        "bicycle",
        "car",
        "bus",
        "boat",
        "train",
        "kite",
        "ball",
        "tree",
        "bench",
        "umbrella",
        None,
        "pizza",
        "surfboard",
        "skateboard",
        "frisbee",
        "clock",
        "tent",
        "ladder",
        "background",
    }
    for part, media in (
        ("thumbnail", "image/jpeg"),
        ("map", "image/jpeg"),
        ("view", "image/jpeg"),
        ("file", "image/png"),
    ):
        answer = api.get(f"/api/photos/1/{part}")
        assert answer.status_code == 200 and answer.headers["content-type"] == media and len(answer.content) > 500, part
    with open(os.path.join(world.images, photo["name"]), "rb") as f:
        assert api.get("/api/photos/1/file").content == f.read()
    page = api.get("/")
    assert page.status_code == 200 and "VSRN photo search" in page.text and "const RERANK = false;" in page.text
    assert "/api/search" in api.get("/openapi.json").json()["paths"] and api.get("/docs").status_code == 200


@pytest.mark.parametrize(
    "url, status, error",
    [
        ("/api/search?q=&k=3", 422, "q: String should have at least 1 character"),
        ("/api/search?k=3", 422, "q: Field required"),
        ("/api/search?q=dog&k=0", 422, "k: Input should be greater than or equal to 1"),
        ("/api/search?q=dog&k=101", 422, "k: Input should be less than or equal to 100"),
        (f"/api/search?q={'dog%20' * 80}", 422, "q: String should have at most 300 characters"),
        (
            "/api/search?q=kayak%20paddle",
            400,
            "the query 'kayak paddle': none of its words is in the model's vocabulary ('kayak', 'paddle'); rephrase it",
        ),
        (
            "/api/search?q=dog&rerank=true",
            400,
            "this server has no LXMERT reranker (start it with --rerank lxmert --model DIR)",
        ),
        ("/api/photos/999", 404, "no photo 999 in this library"),
        ("/api/photos/999/thumbnail", 404, "no photo 999 in this library"),
        ("/api/photos/-1/file", 422, "photo_id: Input should be greater than or equal to 1"),
        ("/api/photos/abc", 422, "photo_id: Input should be a valid integer, unable to parse string as an integer"),
        (f"/api/photos/{2**63}", 422, "photo_id: Input should be less than or equal to 9223372036854775807"),
        (f"/api/photos/{2**64}/view", 422, "photo_id: Input should be less than or equal to 9223372036854775807"),
        ("/api/photos/..%2F..%2Fetc%2Fpasswd/file", 404, "Not Found"),
        ("/api/photos/1/../../../../etc/passwd", 404, "Not Found"),
        ("/../../etc/passwd", 404, "Not Found"),
        ("/api/photos/%2Fetc%2Fpasswd", 404, "Not Found"),
    ],
)
def test_bad_requests_are_json_errors_with_their_status(client, url, status, error):
    answer = client[0].get(url)
    assert answer.status_code == status and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": error}


def test_only_files_under_the_librarys_folders_are_served(client, world, tmp_path):
    api, searcher = client
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not to be served")
    # Records tampered with: a photo's file outside the library's folders is still refused.
    original = searcher.library.photo(2)["path"]
    link = os.path.join(world.images, "a_link.png")  # a link under the library's folders to a file outside
    os.symlink(outside, link)
    writable = sqlite3.connect(os.path.join(searcher.folder, "library.sqlite3"))
    try:
        for tampered in (str(outside), link):
            with writable:
                writable.execute("UPDATE files SET path = ? WHERE photo = 2", (tampered,))
            for part in ("file", "view"):
                answer = api.get(f"/api/photos/2/{part}")
                assert answer.status_code == 404, (tampered, part)
                assert answer.json() == {"error": "photo 2's file is not there any more"}
    finally:
        os.remove(link)
        with writable:
            writable.execute("UPDATE files SET path = ? WHERE photo = 2", (original,))
        writable.close()


def test_the_server_reads_the_records_read_only(client):
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        client[1].library.db.execute("DELETE FROM photos")


def test_an_update_is_picked_up_without_a_restart_and_without_failing_a_query(world, tmp_path, monkeypatch):
    monkeypatch.setattr(searcher_module, "REFRESH_EVERY_S", 0.0)
    lib = str(tmp_path / "lib")
    test_rows = [row for row in world.rows if row.endswith("test_obj36.tsv")]
    assert (
        index.main(
            ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *test_rows, "--library", lib]
        )
        == 0
    )
    api = TestClient(server.create_app(Searcher(lib)), raise_server_exceptions=False)
    assert api.get("/api/search", params={"q": QUERY, "k": 100}).json()["photos"] == 12
    statuses, stop = [], threading.Event()

    def query():
        while not stop.is_set():
            statuses.append(api.get("/api/search", params={"q": QUERY, "k": 20}).status_code)

    clients = [threading.Thread(target=query) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        assert index.main(["--library", lib, "--regions", *world.rows]) == 0  # the dev pictures' rows: 6 more photos
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert statuses and set(statuses) == {200}
    answer = api.get("/api/search", params={"q": QUERY, "k": 100}).json()
    assert answer["photos"] == 18 and len(answer["results"]) == 18
    assert {hit["name"] for hit in answer["results"]} == set(os.listdir(world.images))
    assert Library.open(lib).count() == 18


def test_a_rebuild_with_other_checkpoints_is_picked_up_with_their_models(world, tmp_path, monkeypatch):
    monkeypatch.setattr(searcher_module, "REFRESH_EVERY_S", 0.0)
    lib = str(tmp_path / "lib")
    first = world.checkpoints[0]
    assert (
        index.main(["--images", world.images, "--checkpoint", first, "--regions", *world.rows, "--library", lib]) == 0
    )
    api = TestClient(server.create_app(Searcher(lib)), raise_server_exceptions=False)
    assert api.get("/api/search", params={"q": QUERY, "k": 18}).status_code == 200
    # An ensemble of the first model and a wider one: vectors of 16 + 24 dims, a new text encoder.
    wide = checkpoint(os.path.join(world.root, "run_wide"), world.vocab, TOY_DIM, 5, embed_size=24, dim_vid=24)
    assert index.main(["--library", lib, "--checkpoint", first, wide, "--rebuild"]) == 0
    answer = api.get("/api/search", params={"q": QUERY, "k": 18})
    assert answer.status_code == 200
    expected = Searcher(lib).text(QUERY, k=18)[0]
    assert [hit["id"] for hit in answer.json()["results"]] == [hit["id"] for hit in expected]
    np.testing.assert_allclose(
        [hit["score"] for hit in answer.json()["results"]], [hit["score"] for hit in expected], atol=1e-6
    )


def test_exposed_servers_warn(client, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: None)
    server.serve(client[1], "127.0.0.1", 8123)
    assert capsys.readouterr().err == ""
    server.serve(client[1], "0.0.0.0", 8123)
    assert capsys.readouterr().err.startswith("warning: --host 0.0.0.0: the library is served to other machines too;")
    assert server.loopback("::1") and server.loopback("localhost") and not server.loopback("192.168.1.20")


def test_concurrent_queries_are_encoded_together_as_each_alone(client):
    from photo_library.embedding import QueryBatcher, text_vectors

    searcher = client[1]
    things = ("bench", "kite", "tree", "bus", "cat", "boat", "clock", "tent")
    sentences = [f"a dog next to a {thing}" for thing in things]
    epoch = searcher.current()
    alone = {text: encode_alone(epoch, text.split()) for text in sentences}
    batches = []

    def encode(encoders, token_lists):
        batches.append(len(token_lists))
        while len(batches) == 1 and batcher.waiting.qsize() < 31:  # the first batch is slow: the others queue
            time.sleep(0.01)
        return text_vectors(encoders.models, encoders.vocab, token_lists)

    batcher, answers = QueryBatcher(encode), {}

    def ask(text):
        answers[text] = batcher(epoch, text.split())

    threads = [threading.Thread(target=ask, args=(text,)) for text in sentences * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batches == [1, 31]  # those that waited went together
    for text, vector in answers.items():
        np.testing.assert_allclose(vector, alone[text], atol=1e-6)
