"""Zero-downtime restarts for trio servers.

A server under :func:`open` can replace itself with a new copy of its own program (new
code, new config) without refusing, resetting or cutting short a client connection::

    import trio
    import graceful_restart_trio as graceful_restart

    async def main() -> None:
        async with graceful_restart.open() as gr:
            listeners = await gr.open_tcp_listeners(8000)
            await gr.serve_listeners(handle_connection, listeners)

    trio.run(main)

``kill -HUP`` starts the new copy with the listening sockets, waits until it is ready,
then drains this one; ``kill -TERM`` drains and exits. See the documentation in ``docs/``.
"""

from ._exceptions import GracefulRestartError as GracefulRestartError
from ._exceptions import InheritanceError as InheritanceError
from ._exceptions import ListenerError as ListenerError
from ._exceptions import PidFileError as PidFileError
from ._exceptions import RestartError as RestartError
from ._exceptions import RestartUnavailableError as RestartUnavailableError
from ._exceptions import SocketActivationError as SocketActivationError
from ._exceptions import SuccessorExitedError as SuccessorExitedError
from ._exceptions import SuccessorStartError as SuccessorStartError
from ._exceptions import SuccessorTimeoutError as SuccessorTimeoutError
from ._exceptions import UsageError as UsageError
from ._graceful_restart import DrainReason as DrainReason
from ._graceful_restart import GracefulRestart as GracefulRestart
from ._graceful_restart import Statistics as Statistics
from ._graceful_restart import open as open
from ._leases import LeaseCounter as LeaseCounter
from ._options import OpenOptions as OpenOptions
from ._options import Options as Options
from ._signals import ignore_sighup as _ignore_sighup
from ._state import ACCEPTING as ACCEPTING
from ._state import State as State

__version__ = "0.2.0"

# A SIGHUP before open() installs its handler must not kill the process.
_ignore_sighup()
