"""OpenAI-compatible HTTP gateway: any agent program that talks to an OpenAI endpoint
becomes a source of training data, one `Sample` per model call."""

from forge.gateway.episodes import CallRecord, Episode, EpisodeError, EpisodeStore, episode_samples
from forge.gateway.recording import EpisodeRecorder, read_recorded, standalone_store
from forge.gateway.server import Gateway, GatewayServer, build_app

__all__ = [
    "CallRecord",
    "Episode",
    "EpisodeError",
    "EpisodeRecorder",
    "EpisodeStore",
    "Gateway",
    "GatewayServer",
    "build_app",
    "episode_samples",
    "read_recorded",
    "standalone_store",
]
