"""The SSE gateway: job events with replay, a live job page, signed local files, metrics."""
