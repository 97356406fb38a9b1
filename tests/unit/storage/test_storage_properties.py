"""Property: whatever writers do (write, commit, abort, abandon, mix up bytes), a blob's name only
ever holds bytes that hash to it, and followers never report COMMITTED for wrong bytes."""
from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import BlobStore, BlobWriteError, FollowState, sha256_digest

CONTENTS = [b"alpha" * 50, b"beta" * 70, b"gamma" * 3]
DIGESTS = [sha256_digest(c) for c in CONTENTS]

op = st.one_of(
    st.tuples(st.just("open"), st.integers(0, 2), st.booleans()),  # bool: writer gets wrong bytes
    st.tuples(st.just("write"), st.integers(0, 7), st.integers(1, 400)),
    st.tuples(st.just("commit"), st.integers(0, 7)),
    st.tuples(st.just("abort"), st.integers(0, 7)),
    st.tuples(st.just("follow"), st.integers(0, 2)),
    st.tuples(st.just("read"), st.integers(0, 7), st.integers(1, 500)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40))
def test_random_sequences_never_expose_wrong_bytes(ops) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = BlobStore(root)
        writers: list[tuple] = []  # (writer, source bytes, offset)
        followers: list[tuple] = []  # (follower, which, bytes read)
        for step in ops:
            kind = step[0]
            if kind == "open":
                which, corrupt = step[1], step[2]
                source = CONTENTS[which][::-1] if corrupt else CONTENTS[which]
                writers.append([store.writer(DIGESTS[which]), source, 0])
            elif kind == "write" and writers:
                entry = writers[step[1] % len(writers)]
                w, source, offset = entry
                if w.committed or w._fd is None:
                    continue
                chunk = source[offset : offset + step[2]]
                if chunk:
                    w.write(chunk)
                    entry[2] = offset + len(chunk)
            elif kind == "commit" and writers:
                w = writers[step[1] % len(writers)][0]
                if not w.committed and w._fd is not None:
                    try:
                        w.commit()
                    except BlobWriteError:
                        pass
            elif kind == "abort" and writers:
                writers[step[1] % len(writers)][0].abort()
            elif kind == "follow":
                f = store.follow(DIGESTS[step[1]])
                if f is not None:
                    followers.append([f, step[1], b""])
            elif kind == "read" and followers:
                entry = followers[step[1] % len(followers)]
                entry[2] += entry[0].read(step[2])
            # Invariant: every committed name holds exactly its content.
            for which, digest in enumerate(DIGESTS):
                path = store.path(digest)
                if os.path.exists(path):
                    assert open(path, "rb").read() == CONTENTS[which]
        for f, which, got in followers:
            assert f.state is not FollowState.COMMITTED or got == CONTENTS[which]
            while f.state is FollowState.WRITING and (chunk := f.read(1000)):
                got += chunk
            if f.state is FollowState.COMMITTED:
                assert got == CONTENTS[which]
            f.close()
        for w, _, _ in writers:
            w.abort()
