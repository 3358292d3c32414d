"""Start pproxy on uvloop, as its own `pproxy` script would with an older uvloop.

pproxy 2.7 calls `uvloop.install()` and then `asyncio.get_event_loop()`, which
uvloop >= 0.21 answers with an error instead of a new loop; this launcher makes
`install()` also set a fresh uvloop loop, then runs pproxy's own main with the
same arguments.
"""

import asyncio
import sys

import uvloop


def _install() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(uvloop.new_event_loop())


uvloop.install = _install

from pproxy.server import main  # noqa: E402  (after the patch, which main() uses)

if __name__ == "__main__":
    sys.exit(main())
