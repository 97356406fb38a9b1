"""The ``metahub`` command for operators (the server itself runs under ``twistd metahub``)."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from metahub.app.prefetch import prefetch
from metahub.app.root import Root
from metahub.cache.eviction import run_collection
from metahub.cache.routing import Route, route
from metahub.cache.virtual import build_index
from metahub.config.file import (
    Config,
    ConfigError,
    config_schema,
    config_summary,
    example_text,
    load_config,
)
from metahub.hardware import detect, inspect, machine
from metahub.oci import errors, media
from metahub.oci.grammar import split_reference
from metahub.oci.media import Manifest
from metahub.oci.sizes import format_size
from metahub.web.auth import hash_password
from storage import (
    IndexInUse,
    IndexLock,
    Leases,
    SharedTags,
    Storage,
    VerifyProgress,
    sha256_digest,
    stats,
    verify,
)
from storage.nodes import NodeRecords


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        raise SystemExit(f"metahub: {error}") from None


def config_example(args: argparse.Namespace) -> int:
    """Print the commented example configuration, to start a file from."""
    sys.stdout.write(example_text())
    return 0


def config_schema_command(args: argparse.Namespace) -> int:
    """Print the JSON Schema of the configuration file, for an editor's YAML language server."""
    print(json.dumps(config_schema(), indent=2))
    return 0


def check_config(args: argparse.Namespace) -> int:
    print(config_summary(_load(args.config)))
    print("configuration OK")
    return 0


def cache_reindex(args: argparse.Namespace) -> int:
    """Rebuild this node's index from the blob files (run while this node's server is stopped)."""
    config = _load(args.config)
    try:
        alone = IndexLock(config.storage.index, exclusive=True)
    except IndexInUse:
        raise SystemExit(f"metahub: cache reindex: a metahub server is running on {config.storage.index}; "
                         "stop it first") from None
    storage = Storage(config.storage.path, config.storage.index)
    try:
        result = storage.reindex()
    finally:
        storage.close()
        alone.release()
    print(f"reindexed {result.total} blobs: {result.added} added, {result.removed} removed")
    return 0


def cache_stats(args: argparse.Namespace) -> int:
    """Size and counts of the (shared) store, and what this node's index knows."""
    config = _load(args.config)
    storage = Storage(config.storage.path, config.storage.index)
    try:
        found = stats(storage.blobs)
        indexed = storage.index.count_blobs()
        holders = sorted({lease.holder.rsplit("-", 2)[0] for lease in Leases(config.storage.path).iter_leases() if lease.holder})
    finally:
        storage.close()
    bound = format_size(config.storage.max_size) if config.storage.max_size else "unbounded"
    print(f"store:       {config.storage.path}")
    print(f"size:        {format_size(found.total_bytes)} in {found.blob_count} blobs (max_size: {bound})")
    print(f"index:       {indexed} blobs known to this node ({config.storage.index})")
    print(f"in progress: {found.temp_files} temporary files, {found.leases} leases")
    print(f"quarantined: {found.quarantined}")
    print(f"nodes now holding leases: {', '.join(holders) or 'none'}")
    nodes = NodeRecords(config.storage.path).read_all()
    hits, misses = sum(n.hits for n in nodes), sum(n.misses for n in nodes)
    ratio = f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "n/a"
    print(f"hit ratio:   {ratio} ({hits} hits, {misses} misses, as last reported by each node)")
    print(f"nodes seen:  {len(nodes)}")
    for node in nodes:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(node.last_seen))
        print(f"  {node.node:<40} last seen {seen}, {node.hits} hits, {node.misses} misses")
    return 0


def cache_gc(args: argparse.Namespace) -> int:
    """Evict least recently used blobs down to storage.max_size (under the cluster's gc lease)."""
    config = _load(args.config)
    if config.storage.max_size is None:
        raise SystemExit("metahub: storage.max_size is not set: nothing to collect toward")
    storage = Storage(config.storage.path, config.storage.index)
    try:
        result = run_collection(
            config, storage, Leases(config.storage.path), SharedTags(config.storage.path), time.time(), args.dry_run
        )
        if result is None:
            print("another node is collecting right now; try again later")
            return 1
        if not args.dry_run:
            storage.forget(*result.removed)
    finally:
        storage.close()
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(result.removed)} blobs ({format_size(result.removed_bytes)}): "
          f"{format_size(result.before_bytes)} -> {format_size(result.after_bytes)}; "
          f"kept {len(result.kept_pinned)} pinned, {len(result.kept_recent)} recently used")
    return 0


def cache_verify(args: argparse.Namespace) -> int:
    """Re-hash every blob; corrupt ones move to <store>/quarantine. Exit 1 if any was corrupt."""
    config = _load(args.config)
    storage = Storage(config.storage.path, config.storage.index)

    def progress(step: VerifyProgress) -> None:
        if sys.stderr.isatty():
            print(f"\rverified {step.checked} blobs, {format_size(step.bytes_checked)}", end="", file=sys.stderr)

    try:
        result = verify(storage.blobs, quarantine=True, progress=progress)
        storage.forget(*result.corrupt)
    finally:
        storage.close()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"verified {result.checked} blobs: {len(result.corrupt)} corrupt")
    for digest in result.corrupt:
        print(f"  quarantined {digest}")
    return 1 if result.corrupt else 0


def prefetch_command(args: argparse.Namespace) -> int:
    """Fetch an image's blobs into the store (shared: for every node) with a progress bar."""
    config = _load(args.config)

    async def warm(reactor: Any) -> None:
        done = await prefetch(root=Root(config=config, reactor=reactor), image=args.image, machine_type=args.machine_type)
        print(f"prefetched {args.image}: {done.blobs} blobs, {format_size(done.total_bytes)}")

    return _react(args.image, warm)


def hash_password_command(args: argparse.Namespace) -> int:
    """Print a ``password_hash`` for the config; the password comes from stdin or a prompt."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("metahub: the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise SystemExit("metahub: refusing an empty password")
    print(hash_password(password))
    return 0


def _react(image: str, work: Callable[[Any], Awaitable[None]]) -> int:
    """Run ``work(reactor)`` on a reactor; an upstream's refusal or a bad reference is one line."""
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    failed: list[str] = []

    async def run(reactor: Any) -> None:
        try:
            await work(reactor)
        except errors.RegistryError as error:
            failed.append(f"metahub: {image}: {error.status} {error.code}: {error.message}")
        except ValueError as error:  # a malformed image reference
            failed.append(f"metahub: {error}")

    try:
        task.react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as exit_:  # react always exits; keep our own status
        if exit_.code:
            return int(exit_.code)
    if failed:
        print(failed[0], file=sys.stderr)
        return 1
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    """Fetch IMAGE's index from its upstream (no cache involved) and show what each machine type gets."""
    config = _load(args.config)

    async def report_on(reactor: Any) -> None:
        name, reference = split_reference(args.image)
        root = Root(config=config, reactor=reactor)  # no store: only the upstreams are asked

        async def fetch(target: Route, ref: str) -> Manifest:
            client = root.upstreams.client(target.upstream.name)
            return await client.get_manifest(target.repository, ref, media.UPSTREAM_ACCEPT)

        target = route(config, name)
        virtual = root.virtual.find(target, reference)
        if virtual is not None:
            body, _ = await build_index(config, virtual, fetch)
            manifest = Manifest(body, media.OCI_INDEX, sha256_digest(body))
        else:
            manifest = await fetch(target, reference)
        result = inspect.report(args.image, manifest.body, manifest.media_type, manifest.digest, config)
        print(json.dumps(result, indent=2) if args.json else inspect.render(result))

    return _react(args.image, report_on)


def detect_command(args: argparse.Namespace) -> int:
    """Print this host as a machine type and, with a configuration, the configured types it serves."""
    host, notes = detect.host_machine_type()
    for note in notes:
        print(f"metahub: detect: {note}", file=sys.stderr)
    if args.config is None:
        if args.best:
            raise SystemExit("metahub: detect --best needs --config FILE")
        sys.stdout.write(detect.to_yaml(host))
        return 0
    config = _load(args.config)
    decision = detect.fitting(host, list(machine.machine_types(config.machine_types).values()))
    served = [entry.digest for entry in decision.candidates]
    if args.best:
        if not served:
            raise SystemExit(f"metahub: detect: this host ({', '.join(host.features)}) can serve none of the "
                             f"machine types in {args.config}")
        print(served[0])
        return 0
    sys.stdout.write("# this host as a machine type (metahub detect)\n" + detect.to_yaml(host))
    print(f"# machine types of {args.config} this host can serve, best first: {', '.join(served) or 'none'}")
    for entry, why in decision.beaten:
        print(f"#   {entry.digest}: after the better {served[0]} ({why})")
    for entry, why in decision.refused:
        print(f"#   not {entry.digest}: {why}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="metahub", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    # What every command that reads the file takes, written once.
    configured = argparse.ArgumentParser(add_help=False)
    configured.add_argument("--config", "-c", required=True, help="the configuration file (metahub.yaml)")

    example = commands.add_parser("config-example", help="print a commented example configuration file")
    example.set_defaults(run=config_example)

    schema = commands.add_parser("config-schema", help="print the JSON Schema of the configuration file")
    schema.set_defaults(run=config_schema_command)

    check = commands.add_parser("check-config", help="validate a configuration file and summarise it", parents=[configured])
    check.set_defaults(run=check_config)

    inspecting = commands.add_parser("inspect", help="show the builds an image offers and what each machine type gets", parents=[configured])
    inspecting.add_argument("--json", action="store_true", help="print the report as JSON")
    inspecting.add_argument("image", help="NAME[:TAG], routed like a client's name (e.g. ghcr.io/org/app:1.0)")
    inspecting.set_defaults(run=inspect_command)

    detecting = commands.add_parser("detect", help="print this host as a machine type (CPU, amd64 level, GPU)")
    detecting.add_argument("--config", "-c", help="also list the configured machine types this host can serve")
    detecting.add_argument("--best", action="store_true", help="print only the name of the best one (needs --config)")
    detecting.set_defaults(run=detect_command)

    prefetching = commands.add_parser("prefetch", help="warm the store with an image (all builds, or one machine type's)", parents=[configured])
    prefetching.add_argument("--machine-type", "-m", help="fetch only the build this machine type resolves to")
    prefetching.add_argument("image", help="NAME[:TAG], routed like a client's name")
    prefetching.set_defaults(run=prefetch_command)

    hashing = commands.add_parser("hash-password", help="print a password_hash (scrypt) for an account")
    hashing.set_defaults(run=hash_password_command)

    cache = commands.add_parser("cache", help="maintain the blob store and this node's index")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    reindex = cache_commands.add_parser("reindex", help="rebuild the index from the store's files", parents=[configured])
    reindex.set_defaults(run=cache_reindex)
    stats_parser = cache_commands.add_parser("stats", help="size, blob count, leases and index of the store", parents=[configured])
    stats_parser.set_defaults(run=cache_stats)
    gc = cache_commands.add_parser("gc", help="evict least recently used blobs down to storage.max_size", parents=[configured])
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    gc.set_defaults(run=cache_gc)
    verifying = cache_commands.add_parser("verify", help="re-hash every blob, quarantine corrupt ones", parents=[configured])
    verifying.set_defaults(run=cache_verify)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        status = int(args.run(args))
        sys.stdout.flush()  # here, inside the try: piped output is buffered until exit
        return status
    except BrokenPipeError:
        # `metahub cache stats | head`: the reader left, which is no error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again (Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
