#!/usr/bin/env python3
"""Run one query through the official Neo4j Python driver and print the answer as one JSON line.

Usage: driver_probe.py URI read|write [USER PASSWORD]

The simulator (lb-tests' neo4j-sim) answers every query with one record {server, writes, role}.
On success prints {"ok": true, "server": ..., "writes": ..., "role": ..., "bolt": "5.8"} and exits 0.
On an error prints {"ok": false, "error": <exception class>, "chain": [<classes along __context__>],
"code": <Neo4j code of the server error in the chain, or null>, "message": ...} and exits 1 when the
server answered a FAILURE (e.g. a write on a slave: WriteServiceUnavailable caused by NotALeader with
code Neo.ClientError.Cluster.NotALeader), 2 for a driver/connection failure.
Verified with neo4j==6.4.1 (see requirements.txt).
"""

import json
import sys

import neo4j
from neo4j import GraphDatabase
from neo4j.exceptions import DriverError, Neo4jError


def main() -> int:
    if len(sys.argv) not in (3, 5) or sys.argv[2] not in ("read", "write"):
        print(__doc__, file=sys.stderr)
        return 64
    uri, mode = sys.argv[1], sys.argv[2]
    auth = (sys.argv[3], sys.argv[4]) if len(sys.argv) == 5 else None
    access = neo4j.READ_ACCESS if mode == "read" else neo4j.WRITE_ACCESS
    try:
        with GraphDatabase.driver(
            uri, auth=auth, connection_timeout=5.0, connection_acquisition_timeout=10.0
        ) as driver:
            with driver.session(default_access_mode=access) as session:
                result = session.run("RETURN 1 AS probe")
                record = result.single(strict=True)
                summary = result.consume()
                out = dict(record.items())
                out["ok"] = True
                out["bolt"] = "%d.%d" % tuple(summary.server.protocol_version)
                out["agent"] = summary.server.agent
    except (Neo4jError, DriverError, OSError) as e:
        # The direct (bolt://) driver turns a server's NotALeader into WriteServiceUnavailable raised
        # while handling it: report the server's code from the exception chain.
        chain, server_error, cur = [], None, e
        while cur is not None and len(chain) < 10:
            chain.append(type(cur).__name__)
            if server_error is None and isinstance(cur, Neo4jError):
                server_error = cur
            cur = cur.__cause__ or cur.__context__
        print(json.dumps({
            "ok": False,
            "error": type(e).__name__,
            "chain": chain,
            "code": server_error.code if server_error is not None else None,
            "message": server_error.message if server_error is not None else str(e),
        }))
        return 1 if server_error is not None else 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
