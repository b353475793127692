"""Engine-aware routing: send requests where the engine already holds what they need.

- ``prefix``: the prefix keys of a request (which requests share the leading part of their prompt).
- ``ring``: rendezvous hashing with bounded load (which live worker owns a key).
- ``owners``: the owner table of one router (scheduler or client), and the choice it makes per key.
"""
