"""The ``metahub`` command for operators (the server itself runs under ``twistd metahub``)."""
from __future__ import annotations

import argparse
import sys

from storage import Storage

from .config import Config, ConfigError, config_summary, load_config


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        raise SystemExit(f"metahub: {error}") from None


def check_config(args: argparse.Namespace) -> int:
    print(config_summary(_load(args.config)))
    print("configuration OK")
    return 0


def cache_reindex(args: argparse.Namespace) -> int:
    """Rebuild this node's index from the blob files (run while this node's server is stopped)."""
    config = _load(args.config)
    storage = Storage(config.storage.path, config.storage.index)
    try:
        result = storage.reindex()
    finally:
        storage.close()
    print(f"reindexed {result.total} blobs: {result.added} added, {result.removed} removed")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="metahub", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a configuration file and summarise it")
    check.add_argument("--config", "-c", required=True)
    check.set_defaults(run=check_config)

    cache = commands.add_parser("cache", help="maintain the blob store and this node's index")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    reindex = cache_commands.add_parser("reindex", help="rebuild the index from the store's files")
    reindex.add_argument("--config", "-c", required=True)
    reindex.set_defaults(run=cache_reindex)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
