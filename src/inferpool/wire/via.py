"""The path a request takes: ``Via`` is what a job asks for, ``ServedVia`` what served a line, and
``ViaChoice`` the path chosen for one model's lines of a job (stored on the job, shown by ``batch status``)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel

#: What a job asks for its lines (``--via``, ``metadata.inferpool_via``).
Via = Literal["auto", "realtime", "provider-batch"]
#: What served a line: the real-time API, or the provider's own Batch API.
ServedVia = Literal["realtime", "provider-batch"]
VIA_CHOICES: tuple[str, ...] = get_args(Via)
_VIAS: dict[str, Via] = {"auto": "auto", "realtime": "realtime", "provider-batch": "provider-batch"}


def as_via(value: str) -> Via | None:
    """``value`` as a ``Via``, or None if it is not one."""
    return _VIAS.get(value)


class ViaChoice(BaseModel):
    """The path of one model's lines in one job, and why (``unavailable``: they asked for a Batch API the
    model does not have, and end with ``provider_batch_unavailable``)."""

    via: Literal["realtime", "provider-batch", "unavailable"]
    reason: str
