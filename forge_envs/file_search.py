"""File search: find a value in a generated directory tree with `ls`, `cat` and `grep`
tools, each run as a shell command in the sandbox over a copy of the tree."""

from __future__ import annotations

import json
import random
import shlex
from typing import Any

from forge import sandbox
from forge.env import StepResult, ToolEnv, tool
from forge.env.tools import truncate

SERVICES = [
    "billing",
    "search",
    "auth",
    "payments",
    "mailer",
    "reports",
    "gateway",
    "storage",
    "metrics",
    "chat",
]
KEYS = ["port", "max_connections", "timeout_ms", "replicas", "cache_mb"]
FILLER = ["lorem", "ipsum", "todo", "fixme", "deploy", "notes", "owner", "review", "draft", "legacy"]


def _config(rng: random.Random, values: dict[str, int]) -> str:
    lines = [f"# {rng.choice(FILLER)} {rng.choice(FILLER)}", "[service]"]
    lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def generate_tree(rng: random.Random, num_services: int) -> tuple[dict[str, str], str, str, str]:
    """Files of a fake repository, the (service, key) asked about, and its value.

    Decoys: the same key in every other service, and a stale `.bak` copy of the asked
    service's config with a different value.
    """
    services = rng.sample(SERVICES, num_services)
    files: dict[str, str] = {}
    for service in services:
        values = {key: rng.randint(1, 65_000) for key in rng.sample(KEYS, 3)}
        team = rng.choice(["core", "infra", "growth"])
        files[f"repo/{team}/{service}/config.ini"] = _config(rng, values)
        files[f"repo/{team}/{service}/README.md"] = f"# {service}\n{' '.join(rng.choices(FILLER, k=12))}\n"
    for i in range(rng.randint(2, 5)):
        files[f"repo/docs/{rng.choice(FILLER)}-{i}.md"] = " ".join(rng.choices(FILLER, k=20)) + "\n"
    path = rng.choice([p for p in files if p.endswith("config.ini")])
    service = path.split("/")[2]
    key, value = rng.choice([line.split(" = ") for line in files[path].splitlines() if " = " in line])
    stale = _config(rng, {key: int(value) + rng.randint(1, 500)})
    files[path.replace("config.ini", "config.ini.bak")] = stale
    return files, service, key, value


class FileSearchEnv(ToolEnv):
    """Answer a question about a generated repository by exploring it with `ls`, `cat` and
    `grep`; reply `<answer>value</answer>`. Reward 1.0 for the exact value; one answer ends
    the episode."""

    runs_untrusted_code = True  # the model's shell commands
    system_prompt = (
        "You explore a repository with the ls, cat and grep tools, e.g. "
        '<tool_call>{"name": "grep", "arguments": {"pattern": "port", "path": "repo"}}</tool_call>, '
        "and reply with the final value as <answer>...</answer>."
    )
    max_observation_chars = 3000

    def __init__(self, num_services: int = 6, timeout_s: float = 5.0, min_sandbox_level: int = 0) -> None:
        if not 2 <= num_services <= len(SERVICES):
            raise ValueError(
                f"file_search: num_services={num_services} must be between 2 and {len(SERVICES)}"
            )
        self.num_services = num_services
        self.timeout_s = timeout_s
        self.min_sandbox_level = min_sandbox_level
        self.files: dict[str, str] = {}
        self.answer = ""

    @classmethod
    def generate_tasks(
        cls, num_tasks: int, seed: int, num_services: int = 6, **_: Any
    ) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        tasks = []
        for i in range(num_tasks):
            files, service, key, value = generate_tree(rng, num_services)
            tasks.append(
                {
                    "task_id": f"file-search-{seed}-{i}",
                    "question": f"What is `{key}` in the live config of the `{service}` service?",
                    "files": json.dumps(files),
                    "answer": value,
                }
            )
        return tasks

    def reset(self, task: dict[str, Any], seed: int) -> str:
        self.files = json.loads(task["files"])
        self.answer = str(task["answer"])
        return f"{task['question']} The repository is in ./repo."

    def shell(self, command: str) -> str:
        result = sandbox.run(
            command,
            "shell",
            files=self.files,
            timeout_s=self.timeout_s,
            limits=sandbox.Limits(output_bytes=self.max_observation_chars * 4),
            min_level=self.min_sandbox_level,
        )
        if result.memory_exceeded:
            return "error: killed for using more memory than the command may"
        if result.timed_out:
            return f"error: timed out after {self.timeout_s:.0f}s"
        return truncate((result.stdout + result.stderr).strip() or "(no output)", self.max_observation_chars)

    @tool
    def ls(self, path: str = ".") -> str:
        """List a directory.

        Args:
            path: directory relative to the working directory
        """
        return self.shell(f"ls -p -- {shlex.quote(path)}")

    @tool
    def cat(self, path: str) -> str:
        """Print a file.

        Args:
            path: file relative to the working directory
        """
        return self.shell(f"cat -- {shlex.quote(path)}")

    @tool
    def grep(self, pattern: str, path: str = ".") -> str:
        """Search files under a path for lines matching a regular expression.

        Args:
            pattern: extended regular expression
            path: file or directory to search recursively
        """
        return self.shell(f"grep -rnE -- {shlex.quote(pattern)} {shlex.quote(path)}")

    def score_answer(self, answer: str) -> StepResult:
        success = answer.strip().strip("`'\"") == self.answer
        feedback = "correct" if success else f"wrong: {answer.strip()[:100]!r}"
        return self.done(float(success), success, feedback)
