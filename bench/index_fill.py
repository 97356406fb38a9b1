"""The index's write costs at scenario 9's size, alone: ``python -m bench.index_fill --blobs 100000 --workdir DIR``.

Prints, with the load average at each step (the machine is shared):

* an index-only fill of scenario 9's records (ten blobs and a tag per image), once with one
  transaction per ``put_blob``/``set_tag`` and once through ``Index.batch``;
* the fill of a real store (files committed and index written) by :class:`bench.store_fill.StoreFiller`;
* ``Storage.reindex`` of that store into an empty index;
* ``metahub cache stats`` and ``cache gc`` on it (they read the index and the files; no writes to
  the index but gc's, so batching must leave them where they were).

Runs on older trees too (without ``Index.batch`` it skips the batched fill), so one script gives
the before and the after.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from storage import Index, Storage

from .servers import METAHUB_CLI
from .store_fill import BLOBS_PER_IMAGE, Image, StoreFiller, image

UPSTREAM = "docker.io"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def index_only(path: Path, images: list[Image], batched: bool) -> float:
    """Blobs a second written to a fresh index at ``path``, index calls alone."""
    index = Index(str(path))
    now = time.time()
    started = time.monotonic()
    try:
        if batched:
            with index.batch() as batch:
                for made in images:
                    _records(batch, made, now)
        else:
            for made in images:
                _records(index, made, now)
    finally:
        seconds = time.monotonic() - started
        index.close()
    return len(images) * BLOBS_PER_IMAGE / seconds


def _records(target: object, made: Image, now: float) -> None:
    """What bench.store_fill writes for an image, to an Index or an IndexBatch (the same calls)."""
    key = f"{UPSTREAM}/{made.repository}"
    for digest, body, media_type in made.blobs:
        target.put_blob(digest, len(body), now, media_type=media_type, repository=key)  # type: ignore[attr-defined]
    target.set_tag(UPSTREAM, made.repository, made.tag, made.digest, checked=now)  # type: ignore[attr-defined]


def cli_seconds(config: Path, command: str) -> float:
    started = time.monotonic()
    subprocess.run([str(METAHUB_CLI), "cache", command, "--config", str(config)], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL, timeout=900)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--skip-unbatched", action="store_true", help="skip the one-transaction-per-record fill")
    args = parser.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    images = [image(number) for number in range(-(-args.blobs // BLOBS_PER_IMAGE))]
    print(f"{len(images) * BLOBS_PER_IMAGE} blobs, {len(images)} tags; load {load()}")

    if not args.skip_unbatched:
        rate = index_only(work / "index-single", images, batched=False)
        print(f"index-only fill, a transaction per record: {rate:.0f} blobs/s; load {load()}")
    if hasattr(Index, "batch"):
        rate = index_only(work / "index-batched", images, batched=True)
        print(f"index-only fill, Index.batch:              {rate:.0f} blobs/s; load {load()}")

    store, index = work / "store", work / "index"
    filler = StoreFiller(str(store), str(index), UPSTREAM)
    filler.fill_to(args.blobs)
    timing = filler.timing
    print(f"store fill (files + index): {timing.blobs_per_second:.0f} blobs/s, {timing.seconds:.1f} s, "
          f"of which index {timing.index_seconds:.1f} s; load {load()}")

    shutil.rmtree(index)
    storage = Storage(str(store), str(index))
    started = time.monotonic()
    result = storage.reindex()
    seconds = time.monotonic() - started
    storage.close()
    print(f"reindex of {result.total} blobs into an empty index: {seconds:.1f} s "
          f"({result.total / seconds:.0f} blobs/s); load {load()}")

    config = work / "cli.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "tcp:0", "default_upstream": UPSTREAM, "anonymous": "allow",
        "upstreams": {UPSTREAM: {"url": "http://127.0.0.1:9"}},
        "storage": {"path": str(store), "index": str(index), "max_size": 1, "gc_grace": "1h"},
    }))
    for command in ("stats", "gc"):
        runs = [cli_seconds(config, command) for _ in range(2)]
        print(f"metahub cache {command}: {min(runs):.2f} s (best of 2); load {load()}")
    os.sync()


if __name__ == "__main__":
    main()
