"""Choreography: services that react to events and publish their own, with no coordinator."""
