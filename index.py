"""Index your photos for search: a library that is made once and kept current (see docs/search.md).

    python3 index.py --images DIR [DIR ...] --checkpoint M [M ...] --detector W --library LIB
    python3 index.py --images DIR --checkpoint M --regions FILE.tsv [...] --library LIB   # published rows first
    python3 index.py --library LIB                        # the same folders again: only what changed is done
    python3 index.py --library LIB --checkpoint NEW --rebuild   # re-embed the kept regions with new checkpoints
    python3 index.py --library LIB --forget DIR           # drop the photos of a folder that is gone for good
    python3 index.py --library LIB --check                # verify the records, the vector index and the files
    torchrun --nproc_per_node N index.py ...              # the detector's work over N processes (GPUs)

Pictures are found recursively (jpg, jpeg, png, webp, bmp, tif, tiff). A photo is known by its
content: new ones are extracted and embedded, changed ones redone, removed ones dropped, moved or
renamed ones only change their path; unchanged files are not even read. Several checkpoints are
an ensemble, scored as evaluate_models.py scores it. Stopped at any moment (Ctrl-C, kill -9), the
library keeps what was committed and the same command finishes the rest.

A folder that cannot be listed, a recorded folder that is not there and one that is empty where the
library holds photos keep their photos as they were: the run says so, one line each, and exits with
code 3 (`--forget DIR` removes them). `--check` exits with 3 when it finds a problem.
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import os
import sys

from photo_library.indexer import INDEX_CHOICES, IndexRequest, Indexer
from photo_library.store import database_errors
from utils.device import check_device
from utils.distributed import SINGLE_PROCESS, join_world
from utils.errors import Interrupted, OptionError, VSRNError, report, report_interrupt
from utils.options import ScriptHelpFormatter

NOT_ALL_CHECKED = 3  # the exit code of a run that kept folders it could not look at, or of --check finding problems


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument("--library", required=True, metavar="LIB", help="the library's folder (made when it does not exist)")
    p.add_argument(
        "--images", nargs="+", metavar="DIR", help="folders of photos, searched recursively (default: the library's)"
    )
    p.add_argument(
        "--checkpoint", nargs="+", metavar="M", help="VSRN checkpoint(s) (default: the library's); several: an ensemble"
    )
    p.add_argument(
        "--vocab_path", help="the checkpoint's vocabulary folder, when it cannot be found from the checkpoint"
    )
    p.add_argument("--detector", metavar="W", help="the detector's weights (pytorch_model.bin, see docs/detector.md)")
    p.add_argument(
        "--detector_config", metavar="YAML", help="the detector's config.yaml (default: its published values)"
    )
    p.add_argument(
        "--regions",
        nargs="+",
        default=[],
        metavar="FILE.tsv",
        help="obj36 or generate_tsv.py rows of the photos, matched by file stem; the detector does the rest",
    )
    p.add_argument(
        "--policy", choices=("caffe", "hf"), help="the detector's region selection (default: caffe, VSRN's input)"
    )
    p.add_argument("--boxes", type=int, help="regions per photo (default: 36, VSRN's input)")
    p.add_argument("--min_size", type=int, help="shortest side of the detector's input (default: the policy's)")
    p.add_argument("--max_size", type=int, help="longest side of the detector's input (default: the policy's)")
    p.add_argument("--proposals", type=int, help="RPN proposals kept (default: the policy's, 300)")
    p.add_argument(
        "--index",
        choices=INDEX_CHOICES,
        help="the vector index: auto (default) takes flat up to 50,000 photos, then hnsw within --index_memory, "
        "then ivfpq",
    )
    p.add_argument("--index_memory", type=float, default=4.0, metavar="GB", help="memory the vector index may take")
    p.add_argument(
        "--features_dtype",
        choices=("float32", "float16"),
        help="how the kept region features are stored (default float32; float16 halves their disk)",
    )
    p.add_argument(
        "--rebuild", action="store_true", help="re-embed every photo from its kept regions with --checkpoint"
    )
    p.add_argument(
        "--forget",
        nargs="+",
        default=[],
        metavar="PATH",
        help="drop the records of the files at or under PATH before the folders are scanned (a folder gone for good; "
        "photos to index again) or a recorded --regions file",
    )
    p.add_argument(
        "--check", action="store_true", help="verify the records, the vector index and the files; change nothing"
    )
    p.add_argument(
        "--device", help="cuda or cpu (default: cuda when available; under torchrun each process takes its GPU)"
    )
    p.add_argument("--batch_size", type=int, default=1, help="photos per detector pass of each process")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads that decode photos ahead")
    p.add_argument("--dist_timeout", type=float, default=10.0, help="minutes a torchrun process waits for the others")
    return p


def request_of(args):
    return IndexRequest(
        library=args.library,
        images=args.images,
        checkpoints=args.checkpoint,
        detector=args.detector,
        detector_config=args.detector_config,
        policy=args.policy,
        boxes=args.boxes,
        min_size=args.min_size,
        max_size=args.max_size,
        proposals=args.proposals,
        regions=args.regions,
        forget=args.forget,
        index=args.index,
        index_memory_gb=args.index_memory,
        features_dtype=args.features_dtype,
        rebuild=args.rebuild,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        vocab_path=args.vocab_path,
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.check:
        return check(args)
    world = SINGLE_PROCESS
    try:
        request = request_of(args)
        check_device(args.device)
        world = join_world(args.device, args.dist_timeout)
        with database_errors(args.library):
            indexer = Indexer(request, world)
            summary = indexer.run()
        code = 0
        if world.is_main:
            print(summary)
            for error in indexer.summary.unchecked():
                report(error)
                code = NOT_ALL_CHECKED
        world.close()
    except (VSRNError, OSError) as e:
        code = report(e)
    except Interrupted as e:
        code = report_interrupt(str(e))
    except KeyboardInterrupt:
        code = report_interrupt(f"{args.library} keeps the photos committed so far: rerun the same command to finish")
    return world.exit(code)


def check(args):
    """index.py --check: the report's lines; exit code 3 when it names a problem."""
    from photo_library.check import check_library

    try:
        given = [flag for flag in ("images", "checkpoint", "regions", "forget", "rebuild") if getattr(args, flag)]
        if given:
            raise OptionError(f"--check looks at the library as it is; it takes no --{given[0]}")
        with database_errors(args.library):
            found = check_library(args.library)
    except (VSRNError, OSError) as e:
        return report(e)
    print("\n".join(found.lines))
    return NOT_ALL_CHECKED if found.problems else 0


if __name__ == "__main__":
    sys.exit(main())
