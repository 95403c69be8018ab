#!/usr/bin/env python3
"""Keep one official-driver session pool open and write through it on demand.

Usage: pooled_writes.py URI
Reads lines from stdin; for each line runs one write transaction (the driver's managed
transaction, which retries on transient/connection errors) and prints one JSON line
{"ok": true, "server": ..., "writes": ..., "connection": ...} or {"ok": false, "error": ...}.
Exits at EOF.
The driver keeps its pooled connections between lines, so a failover between two lines shows
whether the pooled connection to the old master is detected and replaced.
"""

import json
import sys

from neo4j import GraphDatabase


def work(tx):
    result = tx.run("CREATE (n) RETURN 1")
    rec = result.single()
    server = result.consume().server
    # The server's id of the Bolt connection (HELLO's `connection_id`): the same id after a
    # balancer failover means the pooled connection itself carried on.
    connection = getattr(server, "_metadata", {}).get("connection_id")
    return {"server": rec["server"], "writes": rec["writes"], "connection": connection}


def main() -> int:
    uri = sys.argv[1]
    with GraphDatabase.driver(uri, auth=None, max_transaction_retry_time=15.0) as driver:
        with driver.session() as session:
            for _ in sys.stdin:
                try:
                    out = {"ok": True, **session.execute_write(work)}
                except Exception as e:  # report, keep going
                    out = {"ok": False, "error": type(e).__name__, "message": str(e)}
                print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
