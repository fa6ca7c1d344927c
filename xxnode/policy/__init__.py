"""Pure scheduling decisions shared by the daemons and the simulator.

Every function here takes state, the current time and (where needed) a
``random.Random`` as arguments and returns a decision: no I/O, no clock, no
randomness of its own.  That is what lets the simulator run the exact code the
shard and node daemons ship.  One module per concept:

- ``node_queue``    the node's per-class run queue (highest class first, FIFO within)
- ``swap_victims``  which jobs' memory to push to swap, and how much
- ``multiqueue``    the shard's per-class queues and head selection
- ``idle_list``     the shard's list of machines with spare memory
- ``probe``         power-of-k choice over probed machines
- ``dispatcher``    the node's choice of shard idle list and when to join/update/leave
"""
