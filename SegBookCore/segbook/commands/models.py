"""`segbook models`: the zoo, with sizes, parameter counts, classes and whether each is cached."""
from ..zoo import get_config, is_cached, list_models, num_parameters

HELP = "list the available models"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    rows = [("name", "size", "params", "in", "classes", "cached", "description")]
    for name in list_models():
        c = get_config(name)
        rows.append((name, c.size or "-", f"{num_parameters(c) / 1e6:.1f}M", str(c.arch.input_channels),
                     str(c.arch.num_classes - 1), "yes" if is_cached(name) else "no", c.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[-1])
    return 0
