"""``python -m raysr.bench {imresize,data,step,overhead,train,validation,upscale} …`` — see raysr/bench/__init__.py."""

import argparse
import importlib
import sys

from raysr.bench import BENCHMARKS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raysr.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed, for results files
    return importlib.import_module(BENCHMARKS[args.bench]).run(args)


if __name__ == "__main__":
    sys.exit(main())
