"""``twistd metahub``: command-line options and the service they build."""
from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.python import usage

from metahub.app.root import Root
from metahub.app.service import server_tree
from metahub.config.file import (
    ConfigError,
    builtin_config,
    endpoint_problem,
    load_config,
)
from metahub.runtime.limits import raise_open_files_limit
from metahub.runtime.memory import tune_malloc

#: Read when no --config is given; without it the built-in default serves.
DEFAULT_CONFIG_FILE = "metahub.yaml"


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = ("Run metahub, a pull-through caching proxy for container registries. Without --config, "
                "./metahub.yaml is read; without that file, a built-in default serves a Docker Hub, "
                "ghcr.io and quay.io cache on 127.0.0.1:5000 with its store in $METAHUB_HOME "
                "(default ./.metahub).")
    optParameters = [
        ["config", "c", None, f"Path of the YAML configuration file (default: ./{DEFAULT_CONFIG_FILE} if it exists)."],
        ["listen", "l", None, "Twisted endpoint to serve on, e.g. tcp:5000:interface=127.0.0.1 (default: config's listen)."],
    ]

    def postOptions(self) -> None:
        # Loading here makes a bad config one line from twistd, not a traceback. SystemExit, not
        # UsageError: twistd prints its whole usage text before a UsageError.
        path = self["config"] or (DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None)
        self.notice: list[str] = []
        try:
            if path is not None:
                self.loaded = load_config(path)
            else:
                home = os.environ.get("METAHUB_HOME") or ".metahub"
                self.loaded = builtin_config(home)
                self.notice = [
                    f"no --config and no ./{DEFAULT_CONFIG_FILE}: serving the built-in default, a cache of "
                    "docker.io (the default), ghcr.io and quay.io with anonymous pulls",
                    f"store and index under {os.path.abspath(home)} (METAHUB_HOME moves them)",
                    f"to use a file instead: metahub config-example > {DEFAULT_CONFIG_FILE}, edit it, "
                    f"check it with metahub check-config --config {DEFAULT_CONFIG_FILE}, and start again",
                ]
        except ConfigError as error:
            raise SystemExit(f"metahub: {error}") from None
        if self["listen"]:
            problem = endpoint_problem(self["listen"])
            if problem is not None:
                raise SystemExit(f"metahub: --listen {self['listen']!r}: {problem}")


def makeService(options: Options) -> IService:
    config = options.loaded
    tune_malloc()  # before the reactor's thread pool starts (memory.py says why)
    raised = raise_open_files_limit()  # before any port listens
    root = Root(config=config, listen=options["listen"] or config.listen, collects=True)
    return server_tree(root=root, notice=[*options.notice, *([raised] if raised else [])])
