"""Config: YAML + dotted overrides, and errors that name the key."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import yaml

from forge.cli import main
from forge.config import ConfigError, known_keys, load_config, parse_override


def test_overrides_set_nested_keys_with_yaml_typed_values():
    cfg = load_config(None, ["train.max_steps=20", "rollout.num_workers=2", "train.tis_cap=2.5"])
    assert cfg.train.max_steps == 20
    assert cfg.rollout.num_workers == 2
    assert cfg.train.tis_cap == 2.5


def test_async_section_is_spelled_async_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("async:\n  max_staleness: 3\n")
    assert load_config(path).async_.max_staleness == 3


def test_unknown_key_is_rejected_with_its_dotted_path():
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        load_config(None, ["train.max_stepz=3"])


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("train.max_stepz=3", "train.max_steps"),  # a typo in its own section
        ("rollout.temprature=0.5", "rollout.temperature"),
        ("trainer.learning_rate=1e-5", "train.learning_rate"),  # the right name in another section
        ("train.lr=1e-5", "train.learning_rate"),  # another trainer's name for it
        ("train.steps=3", "train.max_steps"),
        ("rolout.num_workers=2", "rollout"),  # a misspelt section
    ],
)
def test_an_unknown_key_names_the_key_it_likely_meant_and_the_override_that_set_it(override, meant):
    with pytest.raises(ConfigError) as caught:
        load_config("configs/smoke.yaml", [override])
    message = str(caught.value)
    assert f"did you mean {meant}?" in message
    assert f"set on the command line by {override!r}" in message


def test_an_unknown_key_nothing_resembles_gets_no_guess():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["zzz.qqq=1"])
    assert "zzz: unknown key" in str(caught.value) and "did you mean" not in str(caught.value)


def test_known_keys_are_spelled_as_yaml_spells_them():
    keys = known_keys()
    assert {"async.max_staleness", "env.latency.median_ms", "train.max_steps", "model.lora.r"} <= set(keys)
    assert not any(key.startswith("async_") for key in keys)
    defaults = load_config(None).to_dict()
    for key in keys:  # each one an override may set (sections too, as mappings): here to its default
        value = functools.reduce(lambda node, part: node[part], key.split("."), defaults)
        assert load_config(None, [f"{key}={json.dumps(value)}"]).to_dict() == defaults, key


def test_a_bad_value_names_its_override_and_a_check_speaks_in_forges_words(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["rollout.tasks_per_step=0"])
    assert (
        "rollout.tasks_per_step: Input should be greater than 0 (got 0) (set on the command line by"
        in str(caught.value)
    )
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  group_size: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "the grpo advantage needs at least 2 episodes per task" in message
    assert "Value error" not in message and "<root>" not in message and "command line" not in message


def test_unknown_key_in_yaml_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  num_wrkers: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*rollout\.num_wrkers: unknown key"):
        load_config(path)


def test_a_section_given_twice_in_a_yaml_file_is_refused_naming_both_lines(tmp_path):
    # PyYAML keeps the last of two equal keys: the second train: would drop the first's keys.
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  learning_rate: 0.01\n  max_steps: 9\nseed: 1\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "'train' is given first" in message and "line 1," in message and "line 5," in message
    assert 'in "' + str(path) + '"' in message


@pytest.mark.parametrize("text", ["", "# the settings go here\n", "---\n"])
def test_a_config_file_without_settings_is_refused_and_an_empty_mapping_means_the_defaults(tmp_path, text):
    # Before, an empty file (the wrong one, or one saved empty) trained on every default.
    (tmp_path / "empty.yaml").write_text(text)
    with pytest.raises(
        ConfigError, match=r"empty\.yaml holds no settings .* write `\{\}` to mean the defaults"
    ):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert load_config(tmp_path / "defaults.yaml") == load_config()


def test_a_tab_in_a_yaml_file_names_the_file_line_and_the_fix(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("train:\n\tmax_steps: 5\n")
    with pytest.raises(ConfigError, match=r"indents with spaces, not tabs[\s\S]*tab\.yaml\", line 2"):
        load_config(path)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"train\.max_steps: .*valid integer.*'abc'"):
        load_config(None, ["train.max_steps=abc"])


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match=r"rollout\.group_size: .*greater than 0"):
        load_config(None, ["rollout.group_size=0"])


def test_fsdp_refuses_fp16_which_would_need_loss_scaling():
    with pytest.raises(ConfigError, match=r"fsdp takes train\.mixed_precision no or bf16"):
        load_config(None, ["train.strategy=fsdp", "train.mixed_precision=fp16"])
    ddp = load_config(None, ["train.strategy=ddp", "train.mixed_precision=fp16"])
    assert ddp.train.mixed_precision == "fp16"


def test_override_into_a_value_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(path, ["seed.x=1"])


def test_a_value_yaml_cannot_read_says_how_to_quote_it_and_the_quoted_one_is_a_string():
    with pytest.raises(ConfigError, match=r"""quote it: 'gateway.agent_command="\{python\} my_agent.py"'"""):
        parse_override("gateway.agent_command={python} my_agent.py")
    cfg = load_config(None, ['gateway.agent_command="{python} my_agent.py"'])
    assert cfg.gateway.agent_command == "{python} my_agent.py"


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.max_steps")


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_may_follow_an_option_and_unknown_options_are_refused(capsys, tmp_path):
    assert (
        main(
            [
                "train",
                "configs/smoke.yaml",
                "--output-dir",
                str(tmp_path),
                "train.max_steps=3",
                "--dry-run",
                "rollout.group_size=2",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 3 and printed["rollout"]["group_size"] == 2
    assert printed["output_dir"] == str(tmp_path)
    with pytest.raises(SystemExit):
        main(["train", "configs/smoke.yaml", "--dry-run", "--max-steps", "3"])
    assert "unrecognized arguments: --max-steps 3" in capsys.readouterr().err


def test_dry_run_prints_resolved_config_and_starts_nothing(capsys, tmp_path):
    code = main(
        ["train", "configs/smoke.yaml", "train.max_steps=7", "--dry-run", "--output-dir", str(tmp_path / "r")]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "max_steps: 7" in out
    assert f"output_dir: {tmp_path / 'r'}" in out
    assert not (tmp_path / "r").exists()


def test_cli_reports_bad_key_without_traceback(capsys):
    code = main(["train", "configs/smoke.yaml", "train.lr=1", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.lr: unknown key" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.engine=remote"], "rollout.engine=remote needs rollout.servers"),
        (
            ["train.mode=async", "rollout.engine=server", "rollout.weight_sync=folder"],
            "rollout.weight_sync=folder with",
        ),
        (["gateway.enabled=true", "train.mode=async"], "gateway runs train in sync mode only"),
        (["model.dtype=float16"], "model.dtype=float16 trains float16 weights"),
        (
            ["model.lora.enabled=true", "model.lora.target_modules=[query_key_value]"],
            "model.lora.target_modules names ['query_key_value'], which LlamaForCausalLM has no module for",
        ),
    ],
)
def test_dry_run_refuses_what_the_run_would_refuse(capsys, overrides, message):
    code = main(["train", "configs/smoke.yaml", *overrides, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("overrides", "noted"),
    [
        (["model.dtype=bfloat16", "train.learning_rate=1e-6", "train.master_weights=false"], True),
        (["model.dtype=bfloat16", "train.learning_rate=1e-6"], False),  # float32 master weights
        (["model.dtype=bfloat16", "train.learning_rate=1e-6", "train.num_trainers=2"], False),  # on each
        (["model.dtype=bfloat16", "train.learning_rate=1e-6", "model.lora.enabled=true"], False),
        (["model.dtype=float32", "train.learning_rate=1e-6"], False),
    ],
)
def test_the_dry_run_notes_bfloat16_weights_too_coarse_for_the_learning_rate(
    capsys, tmp_path, overrides, noted
):
    assert main(["train", "smoke", *overrides, "--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert ("train.learning_rate=1e-06 rounds away on every weight larger than 0.0005" in err) == noted


def test_bench_with_an_unknown_name_is_a_clear_error(capsys):
    assert main(["bench", "no_such_bench"]) == 2
    assert "no benchmark 'no_such_bench'" in capsys.readouterr().err


def test_every_loss_knob_reaches_the_loss_config():
    from forge.train.trainer import loss_config

    # Each with the loss that reads it: a clip set for another loss is refused (test_config_trl_names).
    found = [
        getattr(loss_config(load_config(None, [f"train.loss={loss}", f"train.{knob}={value}"]).train), knob)
        for loss, knob, value in [
            ("cispo", "cispo_clip_high", 3.0),
            ("gspo", "gspo_clip_low", 1e-3),
            ("ppo_clip", "clip_high", 0.3),
        ]
    ]
    assert found == [3.0, 1e-3, 0.3]


def test_a_new_run_refuses_a_directory_that_holds_an_earlier_run(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    code = main(["train", "configs/smoke.yaml", "--output-dir", str(tmp_path)])  # refused before Ray starts
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path} already holds a run (metrics.jsonl)" in err
    assert "--resume" in err and "--output-dir" in err and "--overwrite" in err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # left as it was


def test_overwrite_removes_the_earlier_runs_files_and_nothing_else(tmp_path, monkeypatch):
    from forge.metrics import RUN_FILES, RUN_FOLDERS, claim_output_dir
    from forge.run import launch

    for name in RUN_FILES:
        (tmp_path / name).write_text("old")
    for name in RUN_FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("old")
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(FileExistsError, match="already holds a run"):
        claim_output_dir(tmp_path)
    claim_output_dir(tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    claim_output_dir(tmp_path)  # nothing of a run left: a new run may start here

    calls = []  # and the command line asks for it (a stand-in for the run records what it was asked)
    done = SimpleNamespace(steps=0, wall_seconds=0.0, output_dir=tmp_path, checkpoint=None)
    monkeypatch.setattr(launch, "train", lambda cfg, **kwargs: calls.append(kwargs) or done)
    assert main(["train", "configs/smoke.yaml", "--output-dir", str(tmp_path), "--overwrite"]) == 0
    assert calls == [{"resume": False, "overwrite": True}]


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("{tmp}", "it has no config.json"),
        ("{tmp}/missing", "it does not exist); point it at a local folder saved with save_pretrained"),
        ("{tmp}/weights.safetensors", "it is a file); point it at a local folder saved with save_pretrained"),
        (
            "no_such_checkpoint",
            "it does not exist); relative paths are read from the working directory, ",
        ),  # a config run from elsewhere
        (
            "Qwen/Qwen3-0.6B",  # a hub id, offline and not in the (empty) cache
            "model.path='Qwen/Qwen3-0.6B' (model.revision='main') is not in this node's Hugging Face cache",
        ),
    ],
)
def test_the_dry_run_refuses_a_model_path_that_is_not_a_checkpoint_folder(
    capsys, tmp_path, monkeypatch, path, says
):
    from huggingface_hub import constants

    from forge.models.hub import hub_snapshot

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # never the hub in tests
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_snapshot.cache_clear()
    given = path.format(tmp=tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert main(["train", "smoke", f"model.path={given}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    folder = "hf download Qwen/Qwen3-0.6B" if given.startswith("Qwen/") else "Hugging Face checkpoint folder"
    assert folder in err and says in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("saved", "says"),
    [
        ("weights only", "has no tokenizer (none of tokenizer.json"),
        ("no chat template", "has no chat template, which Forge renders every turn through"),
        ("turn ends in plain text", "ends an assistant turn with 'END', neither the tokenizer's eos_token"),
    ],
)
def test_the_dry_run_refuses_a_checkpoint_folder_without_a_usable_tokenizer(capsys, tmp_path, saved, says):
    from forge.models.tiny import build_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    tokenizer = build_tokenizer()
    if saved == "no chat template":
        tokenizer.chat_template = None
    if saved == "turn ends in plain text":  # no token marks a turn's end (tests/test_chat_turn_end.py)
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} END\n{% endfor %}"
        )
    if saved != "weights only":
        tokenizer.save_pretrained(tmp_path)
    assert main(["train", "smoke", f"model.path={tmp_path}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert says in err and "save_pretrained" in err and "Traceback" not in err


def test_a_command_without_its_config_names_only_what_is_missing(capsys):
    with pytest.raises(SystemExit):
        main(["eval"])
    err = capsys.readouterr().err
    assert (
        "the following arguments are required: config, --checkpoint" in err
    )  # not "overrides": they are optional
