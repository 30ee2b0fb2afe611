"""Finished episodes written to disk in the form training uses: one JSON line per
episode holding its `Trajectory` (for reward shaping) and one `Sample` per model call
(advantage 0 until a group's advantages are computed), for a long-running gateway
(`forge serve`) to record agents' calls as training data."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

from forge.gateway.episodes import Episode, EpisodeStore
from forge.types import Sample, Trajectory, Turn


class EpisodeRecorder:
    """Appends each finished episode to `directory/episodes.jsonl` (flushed per episode,
    so a killed server loses at most the episode being written)."""

    def __init__(self, directory: str | Path, success_threshold: float = 1.0) -> None:
        self.path = Path(directory) / "episodes.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.success_threshold = success_threshold
        self._lock = threading.Lock()
        self.written = 0

    def __call__(self, episode: Episode) -> None:
        trajectory = episode.to_trajectory(self.success_threshold)
        samples = [call.to_sample(0.0, episode.group_id) for call in episode.calls if call.completion_ids]
        line = json.dumps(
            {
                "episode_id": episode.episode_id,
                "task": episode.task,
                "trajectory": dataclasses.asdict(trajectory),
                "samples": [dataclasses.asdict(sample) for sample in samples],
            },
            default=str,
        )
        with self._lock, self.path.open("a") as out:
            out.write(line + "\n")
            self.written += 1


def read_recorded(path: str | Path) -> list[tuple[Trajectory, list[Sample]]]:
    """The episodes an `EpisodeRecorder` wrote, as the Trajectory and Samples they were."""
    episodes = []
    with Path(path).open() as lines:
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                fields = dict(record["trajectory"])
                fields["turns"] = [Turn(**turn) for turn in fields["turns"]]
                trajectory = Trajectory(**fields)
                samples = [Sample(**sample) for sample in record["samples"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{path}:{number} is not a recorded episode ({exc}); was it written by "
                    "forge.gateway.recording.EpisodeRecorder?"
                ) from None
            episodes.append((trajectory, samples))
    return episodes


def standalone_store(
    record_dir: str | Path | None = None,
    max_live_episodes: int = 1024,
    keep_finished: int = 256,
    env_factory: Any | None = None,
    step_timeout_s: float = 30.0,
) -> EpisodeStore:
    """The episode store of a long-running gateway: finished episodes are recorded to
    `record_dir` (if given) once their env is closed (a close that failed noted as
    `close_error`), and only the last `keep_finished` kept in memory; past
    `max_live_episodes` live ones, the least recently used is ended (and recorded). Each
    env call, its close included, is given up on after `step_timeout_s`."""
    recorder = EpisodeRecorder(record_dir) if record_dir is not None else None
    return EpisodeStore(
        env_factory,
        step_timeout_s=step_timeout_s,
        on_finished=recorder,
        keep_finished=keep_finished,
        max_live=max_live_episodes,
    )
