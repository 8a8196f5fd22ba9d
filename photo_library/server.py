"""The library served to a browser: one page (page.html) and a JSON API (FastAPI; its OpenAPI description at
/openapi.json).

    GET /                          the page: the library's size, example queries, a search box, the top
                                   photos, their attention maps
    GET /api/library               {"photos", "read_only", "rerank", "words", "examples"}
    GET /api/search?q=&k=&rerank=  {"query", "unknown_words", "notice", "photos", "results": [...]}
    GET /api/photos/{id}           a photo's size, boxes, region names and score-free details
    GET /api/photos/{id}/thumbnail, /map, /view, /file
                                   its thumbnail, the thumbnail with its map, the photo with its map and
                                   top boxes (JPEG), the original file

No request changes anything: the records are opened read-only (immutable where the library's folder cannot
be written, which the page says). Photos are reached by their id only, never by a path, and the only files
read are the photos' own, as the records hold them (originals.py). Each request's Host header must name the
server (hosts.py), and each answer carries headers that keep other sites out: no type sniffing, no framing,
a content security policy (the page runs its own script and style alone), its pictures for its own page
only. /view draws at most two views at a time, from reduced decodes (views.py). Swagger's /docs page is not
served: it loads its scripts from a CDN. Errors are JSON {"error": ...} with their status code; no traceback
and no path leaves the server.
"""

import base64
import errno
import functools
import hashlib
import os
import re
import socket
import sqlite3
import sys
import traceback
from typing import Annotated

from photo_library.examples import example_queries
from photo_library.hosts import loopback, served_names
from photo_library.maps import photo_view, thumbnail_map
from photo_library.originals import open_original
from photo_library.searcher import region_names
from photo_library.views import Views
from utils.errors import DataError, OptionError, one_line, without_path

MAX_QUERY, MAX_K = 300, 100
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id names no photo
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


def import_fastapi():
    try:
        import fastapi
    except ImportError:
        raise OptionError(
            "serving the library needs FastAPI and uvicorn: python3 -m pip install fastapi uvicorn"
        ) from None
    return fastapi


def create_app(searcher, hosts=None):
    """The FastAPI application serving `searcher`'s library to the HostNames `hosts` (default: those of a server
    on 127.0.0.1)."""
    fastapi = import_fastapi()
    searcher.batch_queries()
    app = fastapi.FastAPI(
        title="VSRN photo library",
        description="Search your photos by text with VSRN's embeddings; the paper's attention maps show what "
        "each photo's representation attends to.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    page, policy = page_and_policy()
    add_error_handlers(app)
    add_guards(app, hosts or served_names("127.0.0.1"), policy)
    add_search(app, searcher, page)
    add_photos(app, searcher)
    return app


def page_and_policy():
    """(page.html's text, its content security policy: its own inline script and style, by their digests)."""
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    def digests(tag):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    policy = (
        f"default-src 'none'; script-src {digests('script')}; style-src {digests('style')}; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, policy


def error(status, message):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def add_error_handlers(app):
    """Every error as JSON {"error": ...} with its status; no traceback leaves the server."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    def invalid(request, exc):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error(422, problems)

    @app.exception_handler(OptionError)
    def refused(request, exc):
        return error(400, exc.worded())  # in the library's words, which name no command-line flag

    @app.exception_handler(DataError)
    @app.exception_handler(sqlite3.DatabaseError)
    def unavailable(request, exc):
        public = getattr(exc, "public", None)  # what may leave the server (errors that have one are said elsewhere)
        if public is None:
            print(f"error: {one_line(exc)}", file=sys.stderr)  # the whole line, paths included, for its user
        return error(503, public or "the library cannot be read now (the server's log says why)")

    @app.exception_handler(Exception)
    def failed(request, exc):
        traceback.print_exception(exc, file=sys.stderr)  # for whoever runs the server, not for the client
        return error(500, "the server could not answer this request (its log says why)")


def add_guards(app, hosts, page_policy):
    """Requests whose Host header does not name this server are refused (DNS rebinding); every answer gets the
    security headers, and a content security policy (the page's own, or none for the API's answers)."""

    @app.middleware("http")
    async def guard(request, call_next):
        host = request.headers.get("host", "")
        if hosts.accepts(host):
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001  (answered here, so that it gets the headers too)
                traceback.print_exception(exc, file=sys.stderr)
                response = error(500, "the server could not answer this request (its log says why)")
        else:
            response = error(400, f"this server does not answer to the name {host[:100]!r} (it answers to {hosts})")
        response.headers.update(HEADERS)
        page = request.url.path == "/" and response.headers.get("content-type", "").startswith("text/html")
        response.headers["Content-Security-Policy"] = page_policy if page else API_POLICY
        return response


def add_search(app, searcher, page):
    """The page, /api/library and /api/search."""
    from fastapi import Query
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def show_page():
        return page

    @app.get("/api/library")
    def library():
        epoch = searcher.current()
        return {
            "photos": searcher.library.count(),
            "read_only": searcher.library.read_only,
            "rerank": searcher.reranking is not None,
            "words": len(epoch.vocab),
            "examples": example_queries(epoch.vocab),
        }

    @app.get("/api/search")
    def search(
        q: str = Query(..., min_length=1, max_length=MAX_QUERY, description="the sentence to search for"),
        k: int = Query(10, ge=1, le=MAX_K, description="how many photos"),
        rerank: bool = Query(False, description="LXMERT rescores the top candidates (when the server has it)"),
    ):
        if rerank and searcher.reranking is None:
            raise HTTPException(400, "this server has no LXMERT reranker (start it with --rerank lxmert --model DIR)")
        photos = searcher.library.count()
        answer = {"query": q, "unknown_words": [], "notice": None, "photos": photos, "reranked": bool(rerank)}
        if not photos:
            return {**answer, "notice": "this library holds no photos yet: index some with index.py", "results": []}
        hits, query = searcher.text(q, k, rerank)
        results = [{key: value for key, value in hit.items() if key != "path"} for hit in hits]
        for result in results:
            base = f"/api/photos/{result['id']}"
            result.update(thumbnail=f"{base}/thumbnail", map=f"{base}/map", view=f"{base}/view", file=f"{base}/file")
        # Plain JSON types already: answered as they are, not through FastAPI's encoder, which walks every hit
        # (0.5 ms an answer, holding the interpreter lock that every request of the server needs).
        return JSONResponse({**answer, "unknown_words": query.unknown, "notice": query.notice(), "results": results})


def add_photos(app, searcher, views=None):
    """/api/photos/{id} and its pictures: thumbnail, map, view, file."""
    from fastapi import Path
    from fastapi.responses import Response, StreamingResponse
    from starlette.exceptions import HTTPException

    PhotoId = Annotated[int, Path(ge=1, le=MAX_ID, description="a photo's id, as a search answers it")]
    views = views or Views()

    def record(photo_id):
        found = searcher.library.photo(photo_id)
        if found is None:
            raise HTTPException(404, f"no photo {photo_id} in this library")
        return found

    def original(photo_id):
        """(the photo's record, its file opened as recorded), or 404."""
        found = record(photo_id)
        opened, _ = open_original(searcher.library, photo_id)
        if opened is None:
            raise HTTPException(404, f"photo {photo_id}'s file is not there any more")
        return found, opened

    @functools.lru_cache(maxsize=512)
    def cached_map(photo_id, digest, epoch):
        return thumbnail_map(record(photo_id), searcher.library.thumbnail(photo_id))

    @app.get("/api/photos/{photo_id}")
    def photo(photo_id: PhotoId):
        found = record(photo_id)
        return {
            "id": found["id"],
            "name": os.path.basename(found["path"] or ""),
            "width": found["width"],
            "height": found["height"],
            "boxes": found["boxes"].tolist(),
            "objects": region_names(found),
        }

    @app.get("/api/photos/{photo_id}/thumbnail")
    def thumbnail(photo_id: PhotoId):
        data = searcher.library.thumbnail(photo_id)
        if data is None:
            raise HTTPException(404, f"no photo {photo_id} in this library")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/photos/{photo_id}/map")
    def thumbnail_with_map(photo_id: PhotoId):
        found = record(photo_id)
        return Response(cached_map(photo_id, found["digest"], searcher.library.meta("epoch")), media_type="image/jpeg")

    @app.get("/api/photos/{photo_id}/view")
    def view(photo_id: PhotoId):
        found, opened = original(photo_id)
        with opened:
            try:
                data = views.get((found["digest"], searcher.library.meta("epoch")), lambda: photo_view(found, opened))
            except DataError as e:
                reason = without_path(str(e), opened.name)
                raise HTTPException(404, f"photo {photo_id}'s file cannot be read now ({reason})") from None
        return Response(data, media_type="image/jpeg")

    @app.get("/api/photos/{photo_id}/file")
    def original_file(photo_id: PhotoId):
        _, opened = original(photo_id)
        size = os.fstat(opened.fileno()).st_size
        media = MEDIA_TYPES.get(os.path.splitext(opened.name)[1].lower(), "application/octet-stream")
        return StreamingResponse(chunks(opened), media_type=media, headers={"Content-Length": str(size)})


def chunks(opened, size=1 << 20):
    with opened:
        while data := opened.read(size):
            yield data


def listen(host, port):
    """A socket bound to (host, port), before anything says the server runs; a busy port is one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise OptionError.naming("{host} {address}: not an address to listen on ({why})", address=host, why=e) from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
    except OSError as e:
        listening.close()
        if e.errno == errno.EADDRINUSE:
            raise OptionError.naming(
                "{port} {number}: already in use on {address} (another server? search.py --demo serves on 8000); "
                "choose another {port}",
                number=port,
                address=host,
            ) from None
        why = e.strerror
        raise OptionError.naming("{host} {address}: cannot listen there ({why})", address=host, why=why) from None
    listening.listen(2048)  # connections wait from now on, while the app starts
    return listening


def url(host, port):
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(searcher, host="127.0.0.1", port=8000, allowed_hosts=()):
    """Serve the library until Ctrl-C, to the names of `host` and `allowed_hosts`; warn when it is reachable
    from other machines. A port that cannot be listened on is an OptionError before anything is served."""
    import_fastapi()
    try:
        import uvicorn
    except ImportError:
        raise OptionError("serving the library needs uvicorn: python3 -m pip install uvicorn") from None
    listening = listen(host, port)
    hosts = served_names(host, allowed_hosts)
    if not loopback(host):
        print(
            f"warning: --host {host}: the library is served to other machines too; anyone who reaches port {port} "
            "can search it and see its photos",
            file=sys.stderr,
        )
    if searcher.library.read_only:
        print(f"{searcher.folder}: read-only here: it answers searches, and index.py cannot update it from here")
    print(
        f"Serving {searcher.folder} ({searcher.library.count()} photos) at {url(host, listening.getsockname()[1])} "
        f"(API: /openapi.json; it answers to the names {hosts}); Ctrl-C stops"
    )
    server = uvicorn.Server(uvicorn.Config(create_app(searcher, hosts), log_level="warning"))
    server.run(sockets=[listening])
