"""Engine-aware routing, pure (no Redis): send requests where the engine already holds what they need.

- ``prefix``: the prefix keys of a request (which requests share the leading part of their prompt).
- ``owners``: the owner table of one router (scheduler or client process): which live worker owns a key,
  by rendezvous hashing with bounded load.
"""
