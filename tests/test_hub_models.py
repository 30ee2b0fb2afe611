"""model.path as a Hugging Face hub id: found in the node's Hugging Face cache (here a fake
one laid out as huggingface_hub lays it out, offline: no test ever reaches the hub), loaded by
the driver and by every Ray actor in its own process; clear errors naming the setting."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub

from forge.cli import main
from forge.config import ConfigError, ModelConfig, TinyModelConfig
from forge.models import hub
from forge.models.loading import actor_env, actor_model_source, checkpoint_folder, resolve_model_path

REPO = "forge-test/tiny-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# 4 groups of 8 episodes a step: the random model solves about 1 in 10 (smoke step 1: 0.11), so
# some group scores unevenly and the step trains (with 2 groups of 4 both steps of the tiny
# model built at seed 0 scored 0 throughout: no learning signal, the run stopped with exit 1).
# One rollout worker: an actor resolving the hub id itself as well as two do, one process
# fewer to start on a 2-core machine.
SMOKE_STEPS = ["train.max_steps=2", "rollout.tasks_per_step=4", "rollout.group_size=8",
               "train.minibatches_per_step=1", "train.max_steps_without_signal=0", "rollout.num_workers=1",
               "logging.progress_bar=false", "logging.tensorboard=false"]  # fmt: skip


def fill_cache(cache: Path, repo: str, commit: str, files: Path, ref: str = "main") -> Path:
    """Put the checkpoint in `files` into `cache` as `hf download` leaves it: each file a blob
    named by its hash, the snapshot folder of `commit` symlinks to them, refs/`ref` the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    """The smoke run's tiny model and tokenizer, saved with save_pretrained."""
    from forge.models.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(TinyModelConfig(), tmp_path_factory.mktemp("tiny_files"), seed=0)
    (folder / "forge_tiny.json").unlink()  # Forge's own stamp: not a file a hub repo holds
    return folder


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_files):
    """An offline Hugging Face cache holding REPO at COMMIT (branch main). huggingface_hub read
    the environment when this process imported it: its constants are set here too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    snapshot = fill_cache(cache, REPO, COMMIT, tiny_files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.hub_snapshot.cache_clear()
    yield snapshot
    hub.hub_snapshot.cache_clear()


def test_a_hub_id_resolves_to_its_snapshot_in_the_cache_once_per_process(hf_cache, monkeypatch):
    assert checkpoint_folder(REPO) == hf_cache
    assert resolve_model_path(ModelConfig(path=REPO), "unused") == hf_cache
    assert checkpoint_folder(REPO, COMMIT) == hf_cache  # a pinned commit, as the run's actors get it
    calls = []
    monkeypatch.setattr(hub, "_snapshot", lambda *args: calls.append(args))
    assert checkpoint_folder(REPO) == hf_cache and calls == []  # cached: no second look-up


def test_a_run_gives_its_actors_the_hub_id_pinned_to_the_commit_and_the_hub_settings(
    hf_cache, tiny_checkpoint, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # never passed along: Ray's dashboard shows what is
    model = ModelConfig(path=REPO)
    assert actor_model_source(model, checkpoint_folder(REPO)) == REPO
    assert model.revision == COMMIT  # every node loads the commit the driver found, even if main moves
    assert actor_env(model) == {"HF_HUB_CACHE": str(hf_cache.parents[2]), "HF_HUB_OFFLINE": "1"}
    local = ModelConfig(path=str(tiny_checkpoint))
    assert actor_model_source(local, tiny_checkpoint) == str(tiny_checkpoint) and local.revision == "main"
    assert actor_env(local) == {}


def test_only_model_files_are_fetched(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "merges.txt", "vocab.json", "model.safetensors.index.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "consolidated.safetensors", "pytorch_model.bin", "onnx/model.onnx", "model.gguf",
            "README.md", "original/params.pth"]  # fmt: skip
    fetched = set(filter_repo_objects(repo, allow_patterns=hub.CONFIG_AND_TOKENIZER + hub.SAFETENSORS))
    assert fetched == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "merges.txt", "vocab.json", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    }  # fmt: skip
    assert set(filter_repo_objects(repo, allow_patterns=hub.PYTORCH_BIN)) == {"pytorch_model.bin"}


def test_a_repo_with_only_bin_weights_is_loaded_from_them(tmp_path, monkeypatch, tiny_files):
    from huggingface_hub import constants

    files = tmp_path / "files"
    shutil.copytree(tiny_files, files)
    (files / "model.safetensors").rename(files / "pytorch_model.bin")  # only the name matters here
    snapshot = fill_cache(tmp_path / "cache", "old-org/bin-model", COMMIT, files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.hub_snapshot.cache_clear()
    assert checkpoint_folder("old-org/bin-model") == snapshot
    (snapshot / "pytorch_model.bin").unlink()
    hub.hub_snapshot.cache_clear()
    with pytest.raises(ConfigError, match="has no config.json and model\\*.safetensors or pytorch_model"):
        checkpoint_folder("old-org/bin-model")
    hub.hub_snapshot.cache_clear()


# What a hub repo holds besides the model: none of it may be downloaded.
NOT_THE_MODEL = {
    "consolidated.safetensors": b"c" * 4096,  # Mistral-style second copy of the weights
    "pytorch_model.bin": b"p" * 4096,  # the weights again, in the older format
    "onnx/model.onnx": b"o" * 1024,
    "README.md": b"# a model card",
}


@pytest.fixture
def online_hub(tmp_path, monkeypatch, tiny_files):
    """A local stand-in for the hub (tests.fake_hub) serving `org/tiny` (the tiny model and
    NOT_THE_MODEL) and `old-org/bin-only`, an empty cache, this process pointed at both."""
    from huggingface_hub import constants

    model = {path.name: path.read_bytes() for path in tiny_files.iterdir()}
    bin_only = {name: data for name, data in model.items() if name != "model.safetensors"}
    bin_only |= {"pytorch_model.bin": model["model.safetensors"], "README.md": b"old"}
    repos = {"org/tiny": ("b" * 40, model | NOT_THE_MODEL), "old-org/bin-only": ("c" * 40, bin_only)}
    with FakeHub(repos) as fake:
        cache = tmp_path / "cache"
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        hub.hub_snapshot.cache_clear()
        yield fake, cache, model
    hub.hub_snapshot.cache_clear()


def test_the_processes_of_a_node_download_a_hub_model_once_and_only_its_model_files(online_hub):
    """Three processes resolving the same id at once (a node's trainer and rollout workers)
    share one download: each file is fetched once (huggingface_hub's per-file locks) and
    every process gets the same, whole snapshot."""
    fake, cache, model = online_hub
    env = {
        **os.environ,
        "HF_ENDPOINT": fake.url,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    resolve = "from forge.models.hub import hub_snapshot; print(hub_snapshot('org/tiny'))"
    processes = [
        subprocess.Popen([sys.executable, "-c", resolve], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    folders = {process.communicate(timeout=120)[0].strip() for process in processes}
    assert [process.returncode for process in processes] == [0, 0, 0]
    snapshot = cache / "models--org--tiny" / "snapshots" / ("b" * 40)
    assert folders == {str(snapshot)}
    assert sorted(path for _, path in fake.sent) == sorted(model)  # each model file once, nothing else
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == model
    assert checkpoint_folder("org/tiny") == snapshot  # this process: from the cache, no new download
    assert len(fake.sent) == len(model)


def test_a_repo_without_safetensors_is_fetched_as_pytorch_model_bin(online_hub):
    fake, cache, _ = online_hub
    folder = checkpoint_folder("old-org/bin-only")
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "README.md").exists()
    assert ("old-org/bin-only", "README.md") not in fake.sent


@pytest.mark.parametrize(
    ("given", "revision", "says"),
    [
        ("org/tyni", "main", "the hub has no model 'org/tyni' that this process may read"),
        ("org/tiny", "v2", "'org/tiny' has no branch, tag or commit 'v2'; set model.revision to one it has"),
    ],
)
def test_a_typo_or_an_unknown_revision_online_names_the_setting(capsys, online_hub, given, revision, says):
    assert main(["train", "smoke", f"model.path={given}", f"model.revision={revision}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"forge: model.path={given!r} (model.revision={revision!r}): {says}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("given", "revision", "says"),
    [
        (
            "Qwen/Qwen2.5-0.5B-Instruct",
            "main",
            "model.path='Qwen/Qwen2.5-0.5B-Instruct' (model.revision='main') is "
            "not in this node's Hugging Face cache",
        ),  # fmt: skip
        ("forge-test/tiny-chta", "main", "the cache holds forge-test/tiny-chat (a typo?)"),
        (
            REPO,
            "v2",
            "the cache holds forge-test/tiny-chat at revisions ['0123456789abcdef0123456789abcdef01234567', "
            "'main'], not 'v2'",
        ),  # fmt: skip
    ],
)
def test_a_hub_id_missing_from_the_cache_offline_says_how_to_get_it(capsys, hf_cache, given, revision, says):
    assert main(["train", "smoke", f"model.path={given}", f"model.revision={revision}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert "HF_HUB_OFFLINE=1 forbids downloading it; set HF_HUB_OFFLINE=0" in err
    at = "" if revision == "main" else f" --revision {revision}"
    name = given.split("/")[1]
    assert f"fill the cache on every node (or once, in a cache all nodes share through HF_HUB_CACHE): hf download {given}{at}" in err  # fmt: skip
    assert f"hf download {given}{at} --local-dir /models/{name}, then model.path=/models/{name}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "given", ["./Qwen/Qwen3-0.6B", "/models/Qwen3-0.6B", "~/no/model", "runs/smoke/final"]
)
def test_a_local_looking_path_that_does_not_exist_is_never_tried_on_the_hub(
    capsys, hf_cache, monkeypatch, given
):
    monkeypatch.setattr(hub, "_snapshot", lambda *args: pytest.fail("tried the hub"))
    assert main(["train", "smoke", f"model.path={given}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"model.path={given!r} is not a Hugging Face checkpoint folder (it does not exist)" in err


def test_a_local_folder_wins_over_the_hub_id_of_the_same_name(tmp_path, monkeypatch, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "forge-test" / "tiny-chat")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "_snapshot", lambda *args: pytest.fail("tried the hub"))
    assert checkpoint_folder(REPO) == Path(REPO)


def test_hub_errors_name_the_setting_and_the_token(monkeypatch):
    """The hub's answers (never asked here: snapshot_download raises as it would on them)."""
    import httpx
    from huggingface_hub import errors

    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/api/models/x/y"))
    cases = [
        (errors.GatedRepoError("gated", response=response), "is gated; accept its terms at"),
        (
            errors.RepositoryNotFoundError("missing", response=response),
            "check the spelling; for a private model set HF_TOKEN",
        ),  # fmt: skip
        (
            errors.RevisionNotFoundError("no rev", response=response),
            "has no branch, tag or commit 'v9'; set model.revision",
        ),  # fmt: skip
        (errors.HfHubHTTPError("denied", response=response), "refused access (403); set HF_TOKEN"),
    ]
    for error, says in cases:

        def raise_it(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr("huggingface_hub.snapshot_download", raise_it)
        hub.hub_snapshot.cache_clear()
        with pytest.raises(ConfigError) as caught:
            checkpoint_folder("some-org/some-model", "v9")
        assert "model.path='some-org/some-model' (model.revision='v9')" in str(caught.value)
        assert says in str(caught.value), str(caught.value)
    hub.hub_snapshot.cache_clear()


def test_forge_serve_and_env_check_take_a_hub_id(hf_cache, capsys):
    from forge.rollout.engines.server import make_service

    service = make_service(REPO, max_new_tokens=2, max_context_tokens=64)
    assert service.model_name == REPO  # as vLLM names a hub model it serves
    hub.hub_snapshot.cache_clear()
    with pytest.raises(ConfigError, match="forge serve CHECKPOINT='other/model' \\(--revision='main'\\)"):
        make_service("other/model")
    assert main(["env", "check", "guess_number", "--model", REPO]) == 0
    assert "PASS  tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_forge_train_trains_a_hub_model_its_ray_actors_resolve_themselves(
    ray_session, hf_cache, tmp_path, capsys
):
    """Ray started before HF_HUB_CACHE was set: the actors see the cache only through the
    run's runtime env, and load the model from the hub id they are given."""
    from safetensors.torch import load_file

    assert (
        main(["train", "smoke", f"model.path={REPO}", *SMOKE_STEPS, "--output-dir", str(tmp_path / "run")])
        == 0
    )
    assert "done: 2 steps" in capsys.readouterr().out
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert f"path: {REPO}" in recorded and f"revision: {COMMIT}" in recorded  # the commit the run trained
    before = load_file(str(hf_cache / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert any(not after[name].equal(before[name]) for name in before)  # it trained
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "step" in line][-1] == 2


@pytest.mark.slow
@pytest.mark.parametrize("node", ["offline, its cache lacks the model", "online, the hub lacks the commit"])
def test_a_hub_model_a_node_cannot_resolve_stops_the_run_with_the_hub_message_naming_role_and_node(
    ray_session, hf_cache, tiny_files, tmp_path, capsys, monkeypatch, node
):
    """The driver resolves the hub id from its cache; the run's actors, on a node whose cache
    lacks it, cannot: offline, or online from a hub (tests.fake_hub) that no longer has the
    commit the run pinned. The run stops (exit 1) with the hub's message as the driver would
    have printed it, naming the actor and its node, not as a rollout worker that died."""
    empty = tmp_path / "node_cache"
    empty.mkdir()
    files = {path.name: path.read_bytes() for path in tiny_files.iterdir()}
    with FakeHub({REPO: ("f" * 40, files)}) as fake:
        offline = node.startswith("offline")
        node_env = {"HF_HUB_CACHE": str(empty), "HF_HUB_OFFLINE": "1" if offline else "0"}
        if not offline:
            node_env["HF_ENDPOINT"] = fake.url
        monkeypatch.setattr(hub, "hub_env", lambda: node_env)  # what the run's actors get
        code = main(
            ["train", "smoke", f"model.path={REPO}", *SMOKE_STEPS, "--output-dir", str(tmp_path / "run")]
        )
    err = capsys.readouterr().err
    assert code == 1
    assert f"forge: rollout worker 0 on node {socket.gethostname()} (" in err, err
    assert f"model.path='{REPO}' (model.revision='{COMMIT}')" in err
    if offline:
        assert f"is not in this node's Hugging Face cache ({empty})" in err
        assert f"hf download {REPO} --revision {COMMIT}" in err
    else:
        assert f"has no branch, tag or commit '{COMMIT}'; set model.revision" in err
    assert "rollout worker died" not in err and "Traceback" not in err


def test_a_trainer_that_cannot_resolve_the_hub_id_is_reported_by_its_hub_message(
    ray_session, hf_cache, tmp_path, monkeypatch
):
    """What `forge train` prints when the trainer (or an engine) never started because its node
    cannot resolve the model: the hub's message naming the role and the node, not 'the Trainer
    actor died'."""
    import ray

    from forge.config import load_config
    from forge.run.context import make_trainer
    from forge.run.faults import actor_death_message

    empty = tmp_path / "node_cache"
    empty.mkdir()
    monkeypatch.setattr(hub, "hub_env", lambda: {"HF_HUB_CACHE": str(empty), "HF_HUB_OFFLINE": "1"})
    cfg = load_config(
        "configs/smoke.yaml", [f"model.path={REPO}", f"model.revision={COMMIT}", "train.num_cpus=0.01"]
    )
    trainer = make_trainer(cfg, REPO)
    with pytest.raises(ray.exceptions.RayActorError) as died:
        ray.get(trainer.save.remote(str(tmp_path / "never")), timeout=120)
    message = actor_death_message(died.value, tmp_path)
    assert message is not None and message.startswith(f"trainer on node {socket.gethostname()} ("), message
    assert (
        f"model.path='{REPO}' (model.revision='{COMMIT}') is not in this node's Hugging Face cache" in message
    )
    assert message.endswith(
        f"then model.path=/models/{REPO.split('/')[1]}"
    )  # the fixes, nothing of Ray's after
    assert "Traceback" not in message


def test_a_hub_id_whose_org_is_a_local_folder_names_what_that_folder_holds(
    capsys, hf_cache, tmp_path, monkeypatch, tiny_checkpoint
):
    """`ck/olmo` where ./ck holds olmo2 is most likely a typo of a local folder, not a hub model."""
    shutil.copytree(tiny_checkpoint, tmp_path / "ck" / "olmo2")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "smoke", "model.path=ck/olmo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"there is no folder ck/olmo in {tmp_path} either: ck/ holds olmo2 (a typo?)" in err, err
    assert "Traceback" not in err
