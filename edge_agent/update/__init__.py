"""The update state machine (DESIGN section 4, after Mender's client)."""

from edge_agent.update.events import Event, Outcome, State
from edge_agent.update.machine import UpdateMachine

__all__ = ["Event", "Outcome", "State", "UpdateMachine"]
