"""Option types and shared option groups of the command line (:mod:`core.__main__`)."""
from __future__ import annotations

import argparse
import math


def number(kind, low: float | None = None, *, above: bool = False, name: str = "a number"):
    """An argparse type: ``kind`` at least ``low`` (``above``: greater than ``low``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value):  # nan, inf
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'greater than' if above else 'at least'} {low:g}, got {text}")
        return value
    return parse


POSITIVE = number(int, 1, name="a whole number")
NON_NEGATIVE = number(int, 0, name="a whole number")
POSITIVE_FLOAT = number(float, 0, above=True)


def parse_list(text: str, kind=str) -> tuple:
    """Comma-separated values (``"10,100"``), stripped; ``none`` gives (); ValueError naming a bad item."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{text!r}: expected a comma-separated list of {kind.__name__} values") from None


def k_list(text: str) -> tuple[int, ...]:
    """K values (``"10,100"``), each at least 1."""
    values = parse_list(text, int)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected K values of at least 1, comma-separated (e.g. 10,100), got {text!r}")
    return values


def ray_options(p: argparse.ArgumentParser) -> None:
    """--ray, --ray-address, --ray-cpus and --ray-gpus."""
    p.add_argument("--ray", action="store_true",
                   help="run the parallel work (the index build in shards; evaluate's Sag/Lag batches, Ral and LDS retrains) as Ray tasks on a "
                        "local Ray with this machine's cores (--ray-cpus to choose); results are the same as without")
    p.add_argument("--ray-address", help="run it on a running Ray cluster instead (e.g. ray://head:10001)")
    p.add_argument("--ray-cpus", type=POSITIVE, help="CPUs of the local Ray (default: every core)")
    p.add_argument("--ray-gpus", type=number(float, 0), default=0.0, help="GPUs each Ray task reserves (e.g. 1 or "
                   "0.25: Ray places tasks on GPU nodes and gives each its device); default 0: none reserved, tasks "
                   "run on their CPUs unless --device says otherwise")


def ray_settings(args: argparse.Namespace):
    """Where the parallel work runs: RaySettings with --ray/--ray-address, else None (this process)."""
    from .parallel import RaySettings

    if not (args.ray or args.ray_address):
        if args.ray_gpus:
            raise ValueError("--ray-gpus goes with --ray or --ray-address")
        return None
    return RaySettings(address=args.ray_address, num_cpus=args.ray_cpus, gpus=args.ray_gpus, device=args.device)


def index_with_ray(args: argparse.Namespace, build):
    """``build(mapper)``: the index passes as shard tasks on Ray with --ray/--ray-address, else
    in this process (mapper None)."""
    from .parallel import mapper

    settings = ray_settings(args)
    if settings is None:
        return build(None)
    with mapper(settings) as pool:
        return build(pool)
