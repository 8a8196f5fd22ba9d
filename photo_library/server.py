"""The library served to a browser: one page (page.html) and a JSON API (FastAPI, OpenAPI at /docs).

    GET /                          the page: a search box, the top photos, their attention maps
    GET /api/search?q=&k=&rerank=  {"query", "unknown_words", "notice", "photos", "results": [...]}
    GET /api/photos/{id}           a photo's size, boxes, region names and score-free details
    GET /api/photos/{id}/thumbnail, /map, /view, /file
                                   its thumbnail, the thumbnail with its map, the photo with its map and
                                   top boxes (JPEG), the original file

Read-only: the records are opened read-only and no request changes anything. Photos are reached by
their id only, never by a path, and only files the library records, under its folders, are read.
Errors are JSON {"error": ...} with their status code; no traceback leaves the server.
"""

import functools
import ipaddress
import os
import sys
import traceback
from typing import Annotated

from photo_library.maps import photo_view, thumbnail_map
from photo_library.searcher import region_names
from utils.errors import DataError, OptionError, without_path

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


def import_fastapi():
    try:
        import fastapi
    except ImportError:
        raise OptionError(
            "serving the library needs FastAPI and uvicorn: python3 -m pip install fastapi uvicorn"
        ) from None
    return fastapi


def create_app(searcher):
    """The FastAPI application serving `searcher`'s library."""
    fastapi = import_fastapi()
    searcher.batch_queries()
    app = fastapi.FastAPI(
        title="VSRN photo library",
        description="Search your photos by text with VSRN's embeddings; the paper's attention maps show what "
        "each photo's representation attends to.",
        version="1",
    )
    add_error_handlers(app)
    add_search(app, searcher)
    add_photos(app, searcher)
    return app


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

    @app.exception_handler(Exception)
    def failed(request, exc):
        traceback.print_exception(exc, file=sys.stderr)  # for whoever runs the server, not for the client
        return error(500, "the server could not answer this request (its log says why)")


def add_search(app, searcher):
    """The page and /api/search."""
    from fastapi import Query
    from fastapi.responses import HTMLResponse
    from starlette.exceptions import HTTPException

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            text = f.read()
        return text.replace("{{RERANK}}", "true" if searcher.reranking else "false")

    @app.get("/api/search")
    def search(
        q: str = Query(..., min_length=1, max_length=MAX_QUERY, description="the sentence to search for"),
        k: int = Query(10, ge=1, le=MAX_K, description="how many photos"),
        rerank: bool = Query(False, description="LXMERT rescores the top candidates (when the server has it)"),
    ):
        if rerank and searcher.reranking is None:
            raise HTTPException(400, "this server has no LXMERT reranker (start it with --rerank lxmert --model DIR)")
        hits, query = searcher.text(q, k, rerank)
        results = [{key: value for key, value in hit.items() if key != "path"} for hit in hits]
        for result in results:
            base = f"/api/photos/{result['id']}"
            result.update(thumbnail=f"{base}/thumbnail", map=f"{base}/map", view=f"{base}/view", file=f"{base}/file")
        return {
            "query": q,
            "unknown_words": query.unknown,
            "notice": query.notice(),
            "photos": searcher.library.count(),
            "reranked": bool(rerank),
            "results": results,
        }


def add_photos(app, searcher):
    """/api/photos/{id} and its pictures: thumbnail, map, view, file."""
    from fastapi import Path
    from fastapi.responses import FileResponse, Response
    from starlette.exceptions import HTTPException

    PhotoId = Annotated[int, Path(ge=1, le=MAX_ID, description="a photo's id, as a search answers it")]

    def record(photo_id):
        found = searcher.library.photo(photo_id)
        if found is None:
            raise HTTPException(404, f"no photo {photo_id} in this library")
        return found

    def readable_path(photo_id):
        """The photo's file, when it is still there and lies under the library's folders (links resolved)."""
        path = record(photo_id)["path"]
        if not (path and inside(path, searcher.library.roots()) and os.path.isfile(path)):
            raise HTTPException(404, f"photo {photo_id}'s file is not there any more")
        return path

    @functools.lru_cache(maxsize=512)
    def cached_map(photo_id, epoch):
        thumbnail = searcher.library.thumbnail(photo_id)
        return thumbnail_map(record(photo_id), thumbnail)

    @app.get("/api/photos/{photo_id}")
    def photo(photo_id: PhotoId):
        found = record(photo_id)
        names = region_names(found)
        return {
            "id": found["id"],
            "name": os.path.basename(found["path"] or ""),
            "width": found["width"],
            "height": found["height"],
            "boxes": found["boxes"].tolist(),
            "objects": names,
        }

    @app.get("/api/photos/{photo_id}/thumbnail")
    def thumbnail(photo_id: PhotoId):
        data = searcher.library.thumbnail(photo_id)
        if data is None:
            raise HTTPException(404, f"no photo {photo_id} in this library")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/photos/{photo_id}/map")
    def thumbnail_with_map(photo_id: PhotoId):
        record(photo_id)
        return Response(cached_map(photo_id, searcher.library.meta("epoch")), media_type="image/jpeg")

    @app.get("/api/photos/{photo_id}/view")
    def view(photo_id: PhotoId):
        readable_path(photo_id)
        found = record(photo_id)
        try:
            return Response(photo_view(found), media_type="image/jpeg")
        except DataError as e:
            raise HTTPException(
                404, f"photo {photo_id}'s file cannot be read now ({without_path(str(e), found['path'])})"
            ) from None

    @app.get("/api/photos/{photo_id}/file")
    def original(photo_id: PhotoId):
        path = readable_path(photo_id)
        return FileResponse(
            path, media_type=MEDIA_TYPES.get(os.path.splitext(path)[1].lower(), "application/octet-stream")
        )


def inside(path, roots):
    """Whether the file (symbolic links resolved) lies in one of the library's folders."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root) for root in roots)


def loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(searcher, host="127.0.0.1", port=8000):
    """Serve the library until Ctrl-C; warn when the server is reachable from other machines."""
    import_fastapi()
    try:
        import uvicorn
    except ImportError:
        raise OptionError("serving the library needs uvicorn: python3 -m pip install uvicorn") from None
    if not loopback(host):
        print(
            f"warning: --host {host}: the library is served to other machines too; anyone who reaches port {port} "
            "can search it and see its photos",
            file=sys.stderr,
        )
    print(
        f"Serving {searcher.folder} ({searcher.library.count()} photos) at http://{host}:{port}/ (API: /docs); "
        "Ctrl-C stops"
    )
    uvicorn.run(create_app(searcher), host=host, port=port, log_level="warning")
