"""What a hook author imports: ``Hook``, ``Reject`` and ``Generation`` (see ``inferpool.workers.hooks``
for how hooks are written, registered and run)."""

from inferpool.workers.backend import Generation
from inferpool.workers.hooks import Hook, HookChain, Reject, load_hooks

__all__ = ["Generation", "Hook", "HookChain", "Reject", "load_hooks"]
