"""The process's limit on open files, raised at startup so a thousand clients fit.

Every client connection, every blob file being served or written and every upstream connection
costs a descriptor. Many systems start a process with a soft limit of 1024 open files (the hard
limit is often far higher): at ``wrk -c 1000`` the server would then refuse connections with
EMFILE. The soft limit may be raised to the hard one without privileges, as Go's runtime does at
startup; this raises it once, before any port listens, and says so in the log.
"""
from __future__ import annotations

import resource

#: What to ask for when the hard limit is unlimited (where the kernel accepts that as a hard limit,
#: such as macOS, the soft one must still be a number).
UNLIMITED_TARGET = 1 << 16


def raise_open_files_limit() -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; a line for the log when it changed or could
    not be changed, None when it was already there."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        return (f"open files are limited to {soft} and could not be raised to {target} ({error}): "
                "connections beyond that are refused; raise `ulimit -n`")
    return f"raised the open files limit from {soft} to {target} (the hard limit): one per connection and open blob"
