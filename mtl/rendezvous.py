"""How the worker processes of one trial on one host find each other: a free TCP port for
torch.distributed's rendezvous.  Torch-free, so launchers import it without the runtime."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this host now (another process may take it before the rendezvous
    binds it again: the usual small race of single-host launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
