"""The cluster's two ends below the daemons: the node's dispatcher (idle lists, probes,
placements; the paper's §3.2) and the client that submits jobs to shards.  The node daemon
and xxctl import these; nothing here imports a daemon."""
