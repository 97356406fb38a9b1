"""``twistd metahub``: command-line options and the service they build."""
from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.python import usage

from .config import ConfigError, endpoint_problem, load_config
from .memory import tune_malloc
from .service import MetahubService


class Options(usage.Options):
    synopsis = "--config FILE [--listen ENDPOINT]"
    longdesc = "Run metahub, a pull-through caching proxy for container registries."
    optParameters = [
        ["config", "c", None, "Path of the YAML configuration file (required)."],
        ["listen", "l", None, "Twisted endpoint to serve on, e.g. tcp:5000:interface=127.0.0.1 (default: config's listen)."],
    ]

    def postOptions(self) -> None:
        # Loading here makes a bad config one line from twistd, not a traceback.
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self.loaded = load_config(self["config"])
        except ConfigError as error:
            # SystemExit, not UsageError: twistd prints its whole usage text before a UsageError,
            # and a config error is one line.
            raise SystemExit(f"metahub: {error}") from None
        if self["listen"]:
            problem = endpoint_problem(self["listen"])
            if problem is not None:
                raise SystemExit(f"metahub: --listen {self['listen']!r}: {problem}")


def makeService(options: Options) -> IService:
    config = options.loaded
    tune_malloc()  # before the reactor's thread pool starts (memory.py says why)
    top = MultiService()
    MetahubService(config, options["listen"] or config.listen).setServiceParent(top)
    return top
