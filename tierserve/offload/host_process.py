"""An expert host as a plain process: ``python -m tierserve.offload.host_process``.

Serves one ``ExpertHostCore`` (tierserve.offload.expert_host) on the socket channel
(tierserve.offload.socket_channel): fused compute and the control calls (loading
experts, copying one out, stats). No Ray. Arguments:

* ``--host IP`` (default 127.0.0.1) and ``--port P`` (default 0: any free port);
* the token (64 hex digits) every connection must present: ``--token HEX``, or
  ``--token-stdin``: read it from the first line of standard input, then exit when
  standard input closes (the launcher keeps the pipe open for the host's whole life,
  so a host never outlives the worker that started it, even if the worker is killed);
* ``--linear-backend``, ``--weight-format`` (``HOST_WEIGHT_FORMATS``), ``--num-threads``
  (torch threads; default 1).

Once listening it prints ONE line to standard output, JSON
``{"ip": ..., "port": ..., "pid": ...}``, which ``ProcessHostLauncher`` reads; nothing
else is written there. Without ``--token-stdin`` it serves until killed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m tierserve.offload.host_process", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="IP address to listen on")
    ap.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    tok = ap.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token", help="hex token every connection must present")
    tok.add_argument("--token-stdin", action="store_true",
                     help="read the hex token from the first stdin line; exit when stdin closes")
    ap.add_argument("--linear-backend", default="auto")
    ap.add_argument("--weight-format", default="raw")
    ap.add_argument("--num-threads", type=int, default=1)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    token_hex = sys.stdin.readline().strip() if args.token_stdin else args.token
    from tierserve.offload.expert_host import ExpertHostCore
    from tierserve.offload.socket_channel import start_server

    core = ExpertHostCore(args.linear_backend, args.num_threads, args.weight_format)
    ip, port, _ = start_server(args.host, core, args.port, bytes.fromhex(token_hex))
    print(json.dumps({"ip": ip, "port": port, "pid": os.getpid()}), flush=True)
    if args.token_stdin:
        sys.stdin.read()  # returns at EOF: the launcher closed the pipe or died
        return 0
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
