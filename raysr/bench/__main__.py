"""``python -m raysr.bench {imresize,data} …`` — see raysr/bench/__init__.py."""

import argparse
import importlib
import sys

from raysr.bench import BENCHMARKS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysr.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    return modules[args.bench].run(args)


if __name__ == "__main__":
    sys.exit(main())
