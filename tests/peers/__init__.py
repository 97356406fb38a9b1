"""Real peer programs for integration tests: all on 127.0.0.1, all stopped and removed afterwards.

- ``registry``: docker-registry (distribution 2.8) with our own config; plain, ``auth="htpasswd"``,
  ``auth="token"`` (with a token server), or ``proxy_of=URL`` as a pull-through cache.
- ``token_auth``: the token server and JWT signer behind ``auth="token"``.
- ``relay``: an HTTP relay that counts requests and bytes per path, to prove "fetched once".
- ``oci``: OCI image layouts built on disk: images, indexes, the qnib/bench multi-platform shape.
- ``skopeo``, ``podman``, ``containerd``: the clients (and containerd's daemon) as functions.
- ``sshfs``: a private sshd and an sshfs mount of a directory, as a second node sees shared storage.
- ``isolation``: a throwaway HOME and config so skopeo/podman never touch the user's.
- ``process``: daemons in their own process group with a log file; one-shot commands.
- ``loopback``: the threaded HTTP server the relay and token server share.
- ``ports``, ``require``: free loopback ports; finding programs (missing in CI = failure).

Fixtures wrapping these are in ``tests/conftest.py``.
"""
