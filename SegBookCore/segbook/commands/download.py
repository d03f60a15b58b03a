"""`segbook download NAME`: fetch a released checkpoint and convert it; `--progress json` reports the bytes
downloaded as progress events on stdout (what the Slicer panel reads), `bar` draws them on stderr."""
from ..events import make_reporter
from ..zoo import fetch

HELP = "download and convert a released model into the local cache"


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="+", help="model name(s), see `segbook models`")
    parser.add_argument("--progress", default="none", choices=["bar", "json", "none"],
                        help="download progress: bar (stderr), json (one event per line on stdout), none "
                             "(huggingface_hub's own bar, shown on a terminal)")


def run(args) -> int:
    reporter = make_reporter(args.progress)
    for name in args.name:
        folder = fetch(name, reporter=None if args.progress == "none" else reporter)
        if args.progress == "json":
            reporter.done(model=name, folder=str(folder))
        else:
            print(f"{name}: {folder}")
    return 0
