"""What ``/metrics`` says about the event streams (README: Scaling the gateway): streams open,
viewers in the fan-out, events fanned out, viewers dropped for falling behind, streams whose
client stopped reading, and streams refused at the door and why."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class StreamMetrics:
    """The gateway process's stream figures, in the registry ``/metrics`` serves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open_streams = Gauge(
            "refgen_gateway_open_streams",
            "Event streams this gateway process holds open.",
            registry=registry,
        )
        self.viewers = Gauge(
            "refgen_gateway_fanout_viewers",
            "Viewers subscribed to the fan-out (replaying or live).",
            registry=registry,
        )
        self.fanned_out = Counter(
            "refgen_gateway_events_fanned_out",
            "Events handed to viewers by the fan-out (one per event per viewer).",
            registry=registry,
        )
        self.dropped = Counter(
            "refgen_gateway_viewers_dropped",
            "Viewers let go by the fan-out for falling behind (each catches up from the "
            "stream by itself).",
            registry=registry,
        )
        self.stalled = Counter(
            "refgen_gateway_streams_stalled",
            "Streams closed because their client stopped reading (it resumes with Last-Event-ID).",
            registry=registry,
        )
        self.refused = Counter(
            "refgen_gateway_streams_refused",
            "Event streams answered 503 at the door, by reason.",
            ["reason"],
            registry=registry,
        )
