"""State in Redis, one module per kind: jobs, their items (and pending requests), results, usage, the live
load view, heartbeats, dead letters, streams, and the scheduler lease's fence. Key names are in
``inferpool.constants``; what crosses the wire is in ``inferpool.wire``."""
