"""Install NLTK's punkt tokenizer data, so captions tokenize exactly as in the original VSRN.

    python utils/download_nltk.py [--dir DIR]

Honours the HTTP_PROXY / HTTPS_PROXY environment variables (urllib reads them).
"""
import argparse
import sys

import nltk


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="download folder (default: NLTK's own choice, e.g. ~/nltk_data)")
    args = parser.parse_args(argv)
    ok = all(nltk.download(package, download_dir=args.dir, quiet=True) for package in ("punkt", "punkt_tab"))
    if not ok:
        print("error: could not download NLTK's punkt data; set HTTPS_PROXY if you are behind a proxy", file=sys.stderr)
        return 1
    print("NLTK punkt data installed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
