"""Search a photo library made by index.py: a sentence in, the best photos out (see docs/search.md).

    python3 search.py --library LIB "a dog running on the beach" [-k 10] [--json] [--maps DIR]
    python3 search.py --library LIB "a dog on a bench" --rerank lxmert --model LXMERT_DIR [--rerank_k 50]
    python3 search.py --library LIB --like PHOTO          # photos like this one
    python3 search.py --library LIB --serve [--host 127.0.0.1 --port 8000]   # the page and its API
    python3 search.py --demo                              # the toy world's library, made and served

The sentence goes through the library's VSRN text encoder(s); words outside the vocabulary are
named, and a sentence of only unknown words is refused. Scores are VSRN's similarity (an
ensemble's average); `--rerank lxmert` rescores the top candidates with LXMERT's matching head.
On a CPU the sentence is encoded with int8 weights in the text encoder's GRU (`--text_encoder
float32` for the model's own encoder).
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import contextlib
import json
import sys

from utils.errors import OptionError, run_job
from utils.options import ScriptHelpFormatter


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument("query", nargs="?", help="the sentence to search for")
    p.add_argument("--library", metavar="LIB", help="the library's folder (made by index.py)")
    p.add_argument("-k", type=int, default=10, help="how many photos")
    p.add_argument("--json", action="store_true", help="print the results as JSON (for scripts)")
    p.add_argument("--maps", metavar="DIR", help="write each photo found with its attention map to DIR")
    p.add_argument("--like", metavar="PHOTO", help="photos like this one (one outside the library is extracted first)")
    p.add_argument("--rerank", choices=("lxmert",), help="rescore the top candidates with LXMERT's matching head")
    p.add_argument("--model", metavar="DIR", help="with --rerank lxmert: LXMERT's weights (see docs/lxmert.md)")
    p.add_argument("--rerank_k", type=int, default=50, help="candidates LXMERT rescores")
    p.add_argument("--alpha", type=float, default=1.0, help="candidates rank by alpha*LXMERT + (1-alpha)*VSRN")
    p.add_argument(
        "--checkpoint", nargs="+", metavar="M", help="the library's checkpoints, moved elsewhere (same files)"
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--text_encoder",
        choices=("int8", "float32"),
        default="int8",
        help="how the sentence is encoded on a CPU: int8, the text encoder's GRU with int8 weights (2.4-4.3x "
        "faster, the same top 10 to 0.99; docs/search.md), or float32, the model's own (a GPU runs float32)",
    )
    p.add_argument("--serve", action="store_true", help="serve the page and the API")
    p.add_argument(
        "--host", default="127.0.0.1", help="with --serve: the address to listen on (other machines: 0.0.0.0)"
    )
    p.add_argument("--port", type=int, default=8000, help="with --serve: the port")
    p.add_argument(
        "--allow_host",
        nargs="+",
        default=[],
        metavar="NAME",
        help="with --serve: other names the server answers to (a reverse proxy's); any other Host is refused",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="make the toy world's library (training the demo first if needed) and serve it",
    )
    return p


def check(args):
    if args.demo:
        args.serve = True
    elif not args.library:
        raise OptionError("--library LIB: the library to search (make one with index.py), or --demo")
    if args.query and args.like:
        raise OptionError(f"a sentence ({args.query!r}) and --like {args.like}: search by one of them at a time")
    if not args.demo and not args.serve and not (args.query or args.like):
        raise OptionError('give a sentence to search for ("a dog on a bench"), or --like PHOTO, or --serve')
    if args.k < 1 or args.rerank_k < 1:
        raise OptionError("-k and --rerank_k: expected at least 1")
    if not 0 <= args.alpha <= 1:
        raise OptionError(f"--alpha {args.alpha}: must lie in [0, 1]")
    if args.rerank and not args.model:
        raise OptionError("--rerank lxmert needs LXMERT's weights: --model DIR (see docs/lxmert.md)")
    if args.like and args.rerank:
        raise OptionError("--rerank rescores a sentence's candidates; --like searches by a photo")


def print_hits(hits, args, searcher, heading, query=None):
    if args.json:
        out = {"query": args.query, "like": args.like, "photos": searcher.library.count(), "results": hits}
        if query is not None:
            out.update(unknown_words=query.unknown)
        print(json.dumps(out, indent=1))
        return
    print(heading)
    for hit in hits:
        scores = f"{hit['score']:.4f}" + (
            f"  (VSRN {hit['vsrn']:.4f}, LXMERT {hit['lxmert']:.4f})" if "lxmert" in hit else ""
        )
        print(f"  {hit['rank']:>3}. {scores}  {hit['path']}")


def run(args):
    from photo_library.store import database_errors

    check(args)
    if args.demo:
        from photo_library.demo import demo_library

        args.library = demo_library()
    with database_errors(args.library):
        return search(args)


def search(args):
    from photo_library.searcher import Searcher

    searcher = Searcher(args.library, args.checkpoint, args.device, args.text_encoder)
    if args.rerank:
        searcher.enable_rerank(args.model, args.rerank_k, args.alpha)
    if args.demo:
        from photo_library.demo import show_examples

        show_examples(searcher)
    if args.serve:
        from photo_library.server import serve

        return serve(searcher, args.host, args.port, args.allow_host)
    count = searcher.library.count()
    if not count:
        raise OptionError.naming(
            "{library} {folder}: holds no photos yet; index some with index.py", folder=args.library
        )
    if args.like:
        hits, query = searcher.like(args.like, args.k), None
        heading = f"The {len(hits)} photos of {count} most like {args.like}:"
    else:
        hits, query = searcher.text(args.query, args.k, rerank=bool(args.rerank))
        if query.notice():
            print(f"warning: {query.notice()}", file=sys.stderr)
        heading = f"The top {len(hits)} of {count} photos for {args.query!r}" + (
            ", reranked by LXMERT:" if args.rerank else ":"
        )
    print_hits(hits, args, searcher, heading, query)
    if args.maps:
        from photo_library.maps import write_maps

        records = [searcher.library.photo(hit["id"]) for hit in hits]
        # Under --json, stdout holds the JSON alone: the files written are said on stderr.
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            write_maps(args.maps, hits, records, args.query or args.like)
    return hits


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_job(
        lambda: run(args), "searches change nothing; --demo keeps what it made and the same command goes on from there"
    )


if __name__ == "__main__":
    sys.exit(main())
