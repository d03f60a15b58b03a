"""`segbook download NAME`: fetch a released checkpoint (progress bar from huggingface_hub) and convert it."""
from ..zoo import fetch

HELP = "download and convert a released model into the local cache"


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="+", help="model name(s), see `segbook models`")


def run(args) -> int:
    for name in args.name:
        print(f"{name}: {fetch(name)}")
    return 0
