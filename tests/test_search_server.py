"""search.py --serve: the API through FastAPI's test client (status codes, limits, traversal attempts,
bad queries), read-only records, and a server that picks up index.py's updates without a restart."""

import os
import re
import socket
import sqlite3
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import index  # noqa: E402
from conftest import ROOT  # noqa: E402
from photo_library import searcher as searcher_module  # noqa: E402
from photo_library import server  # noqa: E402
from photo_library.hosts import loopback, served_names  # noqa: E402
from photo_library.searcher import Searcher  # noqa: E402
from photo_library.searcher import encode_alone  # noqa: E402
from photo_library.store import Library  # noqa: E402
from photo_world import TOY_DIM, checkpoint, make_world  # noqa: E402
from utils.errors import OptionError  # noqa: E402

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
    return served(searcher), searcher


def served(searcher, **hosts):
    """A test client of the app, asking as a browser on this machine does (Host: 127.0.0.1:8000)."""
    app = server.create_app(searcher, **hosts)
    return TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


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
    assert page.status_code == 200 and "VSRN photo search" in page.text
    assert "/api/search" in api.get("/openapi.json").json()["paths"]
    assert api.get("/docs").status_code == 404  # Swagger's page loads its scripts from a CDN: not served


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
    api = served(Searcher(lib))
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
    api = served(Searcher(lib))
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

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: sockets[0].close())
    server.serve(client[1], "127.0.0.1", 0)
    assert capsys.readouterr().err == ""
    server.serve(client[1], "0.0.0.0", 0)
    assert capsys.readouterr().err.startswith("warning: --host 0.0.0.0: the library is served to other machines too;")
    assert loopback("::1") and loopback("localhost") and not loopback("192.168.1.20")


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


# ---------------------------------------------------------------------------------------------
# What a hostile page, an odd file system or a moved file meets


def test_a_host_header_that_does_not_name_the_server_is_refused(client):
    api, searcher = client
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", "[::1"):
        answer = api.get("/api/photos/1/file", headers={"Host": host})
        assert answer.status_code == 400, host
        assert answer.json()["error"].startswith("this server does not answer to the name")
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
        assert api.get("/api/photos/1/file", headers={"Host": host}).status_code == 200, host
    proxied = served(searcher, hosts=served_names("127.0.0.1", ["photos.home"]))
    assert proxied.get("/api/library", headers={"Host": "photos.home"}).status_code == 200
    every = served_names("0.0.0.0")
    assert every.accepts("192.168.1.20:8000") and every.accepts("[fe80::1]") and not every.accepts("evil.example")
    assert not served_names("192.168.1.20").accepts("localhost")


def test_answers_carry_headers_that_keep_other_sites_out(client, monkeypatch):
    import base64
    import hashlib
    import re

    api, _ = client
    for url in ("/", "/api/library", "/api/photos/1/thumbnail", "/api/photos/1/file", "/api/photos/999"):
        answer = api.get(url)
        assert answer.headers["x-content-type-options"] == "nosniff", url
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], url
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["cross-origin-resource-policy"] == (
            "same-origin"
        )
    monkeypatch.setattr(Library, "thumbnail", lambda self, photo: 1 / 0)  # any failure: a 500 has them too
    answer = api.get("/api/photos/1/thumbnail")
    monkeypatch.undo()
    assert answer.status_code == 500 and answer.headers["x-content-type-options"] == "nosniff"
    assert answer.json() == {"error": "the server could not answer this request (its log says why)"}
    page = api.get("/")
    policy = page.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", page.text, flags=re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and " style=" not in page.text and "https:" not in page.text


def test_the_library_answer_opens_the_page(client, world):
    answer = client[0].get("/api/library").json()
    assert answer["photos"] == 18 and answer["read_only"] is False and answer["rerank"] is False
    assert answer["words"] == len(world.vocab) and len(answer["examples"]) == 3
    for example in answer["examples"]:
        assert all(word in world.vocab.word2idx for word in example.split()), example
    assert answer["examples"][0].startswith("a ") and " next to a " in answer["examples"][0]


def test_file_serves_only_the_file_recorded(world, tmp_path):
    import shutil

    from photo_world import photo_folder

    folder = tmp_path / "photos"
    paths = photo_folder(world, folder, 6)
    os.symlink(paths[1], folder / "a_link_to_one.png")  # links are not indexed: the original is served
    lib = str(tmp_path / "lib")
    args = ["--images", str(folder), "--checkpoint", world.checkpoints[0], "--regions", *world.rows]
    assert index.main([*args, "--library", lib]) == 0
    searcher = Searcher(lib)
    api = served(searcher)
    assert len(searcher.library.files()) == 6

    def served_file(path):
        return api.get(f"/api/photos/{searcher.library.photo_of_path(path)}/file")

    with open(paths[1], "rb") as f:
        assert served_file(paths[1]).content == f.read()
    photo = searcher.library.photo_of_path(paths[0])
    hidden = folder / ".hidden.png"
    shutil.copy(paths[2], hidden)
    os.remove(paths[0])
    os.symlink(hidden, paths[0])  # a photo swapped for a link to a hidden file inside the folder
    for part in ("file", "view"):
        answer = api.get(f"/api/photos/{photo}/{part}")
        assert answer.status_code == 404 and answer.json() == {"error": f"photo {photo}'s file is not there any more"}
    before = searcher.library.photo_of_path(paths[3])
    with open(paths[3], "ab") as f:  # changed since it was indexed: not the photo any more
        f.write(b"more")
    assert api.get(f"/api/photos/{before}/file").status_code == 404
    copy = folder / "zz_copy.png"  # a copy: the photo is served from whichever of its files is as recorded
    shutil.copy(paths[4], folder / "aa_copy.png")
    shutil.copy(paths[4], copy)
    assert index.main(["--library", lib]) == 0
    os.remove(folder / "aa_copy.png")
    with open(paths[4], "rb") as f:
        assert api.get(f"/api/photos/{searcher.library.photo_of_path(str(copy))}/file").content == f.read()


def test_a_checkpoint_moved_after_a_rebuild_is_one_line_until_it_is_back(world, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(searcher_module, "REFRESH_EVERY_S", 0.0)
    lib = str(tmp_path / "lib")
    args = ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows]
    assert index.main([*args, "--library", lib]) == 0
    api = served(Searcher(lib))
    new = str(tmp_path / "new.pth.tar")
    shutil.copy(checkpoint(os.path.join(world.root, "run_moved"), world.vocab, TOY_DIM, 9), new)
    assert index.main(["--library", lib, "--checkpoint", new, "--rebuild"]) == 0
    os.rename(new, new + ".moved")
    capsys.readouterr()
    for _ in range(3):
        answer = api.get("/api/search", params={"q": QUERY})
        assert answer.status_code == 503 and answer.json()["error"].startswith(
            "the library was re-embedded with checkpoints this server cannot load"
        )
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and said[0].startswith(f"error: {lib}: its checkpoint {new} is not there any more")
    os.rename(new + ".moved", new)
    assert api.get("/api/search", params={"q": QUERY}).status_code == 200


def test_an_empty_library_answers_with_a_notice(world, tmp_path):
    from photo_world import photo_folder

    folder = tmp_path / "photos"
    paths = photo_folder(world, folder, 2)
    lib = str(tmp_path / "lib")
    args = ["--images", str(folder), "--checkpoint", world.checkpoints[0], "--regions", *world.rows]
    assert index.main([*args, "--library", lib]) == 0
    for path in paths:
        os.remove(path)
    assert index.main(["--library", lib, "--forget", str(folder)]) == 0
    api = served(Searcher(lib))
    answer = api.get("/api/search", params={"q": QUERY}).json()
    assert answer["results"] == [] and answer["photos"] == 0 and answer["notice"].startswith("this library holds no")
    assert api.get("/api/library").json()["photos"] == 0


def test_serving_on_every_ipv6_address_prints_a_url(client, monkeypatch, capsys):
    import uvicorn

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: sockets[0].close())
    try:
        server.serve(client[1], "::", 0)
    except OptionError:
        pytest.skip("IPv6 cannot be listened on here")
    assert re.search(r"at http://\[::\]:\d+/ ", capsys.readouterr().out)


@pytest.mark.slow
def test_concurrent_views_of_a_large_photo_stay_in_bounded_memory(tmp_path):
    """16 clients view one 8000 x 8000 JPEG at once (bench/library_views.py): the server's peak memory grows by
    less than 300 MB (it grew by 13.5 GB when each view decoded the whole picture)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("library_views", os.path.join(ROOT, "bench", "library_views.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lib = bench.make_library(str(tmp_path), 8000, 1, "jpeg")
    found = bench.concurrent_views(lib, clients=16, photos=1)
    assert found["statuses"] == ["200"], found
    assert found["growth_mb"] < 300, found
