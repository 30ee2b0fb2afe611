"""The `forge` command: parses arguments and hands off; no logic lives here."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import yaml

SIGPIPE_EXIT = 141  # 128 + SIGPIPE, the status a shell reports for a program the signal ended
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as for a program Ctrl-C ended
TERMINATED_EXIT = 143  # 128 + SIGTERM


# SIGTERM, once it came: Ray re-raises what a handler raised as a plain KeyboardInterrupt.
_SIGNALLED: list[int] = []


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's preemption, `kill`): the run stops as on Ctrl-C, its actors shut down."""
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _has_steps(output_dir: str) -> bool:
    metrics = os.path.join(output_dir, "metrics.jsonl")
    return os.path.isfile(metrics) and os.path.getsize(metrics) > 0


def _train(args: argparse.Namespace) -> int:
    from forge.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.resume:
        cfg.output_dir = args.resume
    if args.dry_run:
        from pathlib import Path

        from forge.metrics import check_output_dir
        from forge.run.launch import check_resumable, preflight

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        if args.resume:
            check_resumable(cfg)
        else:
            try:  # said, not refused: a dry run after a run into the same folder is the usual order
                check_output_dir(Path(cfg.output_dir), args.overwrite)
            except FileExistsError as exc:
                print(f"forge: note: without --dry-run the run would stop here: {exc}", file=sys.stderr)
        print(f"forge: {preflight(cfg, wait_for_servers=False)}", file=sys.stderr)
        return 0
    from forge.failures import RunStopped
    from forge.run.launch import train

    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except RunStopped as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the run's actors were shut down on the way out (its finally)
        from forge.run.faults import resume_hint

        how, code = ("SIGTERM", TERMINATED_EXIT) if _SIGNALLED else ("Ctrl-C", INTERRUPTED_EXIT)
        kept = (
            f"; its steps so far are in {cfg.output_dir}/metrics.jsonl" if _has_steps(cfg.output_dir) else ""
        )
        hint = resume_hint(cfg.output_dir, args.config, cfg.train.checkpoint_every)
        print(f"forge: interrupted ({how}), so the run stopped{kept}.{hint}", file=sys.stderr)
        return code
    except Exception as exc:
        from forge.disk import write_failure_message
        from forge.run.faults import actor_death_message, resume_hint

        every = cfg.train.checkpoint_every
        message = actor_death_message(exc, cfg.output_dir, args.config, every)
        if message is None and (wrote := write_failure_message(exc, cfg.output_dir)) is not None:
            message = wrote + resume_hint(cfg.output_dir, args.config, every, write_failed=True)
        if message is None:
            raise
        print(f"forge: {message}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(
        f"done: {result.steps} steps in {result.wall_seconds:.0f}s; metrics in {result.output_dir}/metrics.jsonl; "
        f"checkpoint {result.checkpoint}"
    )
    return 0


def _sft(args: argparse.Namespace) -> int:
    from forge.config import load_config
    from forge.sft import sft

    cfg = load_config(args.config, args.overrides)
    output = args.output_dir or f"{cfg.output_dir}-sft"
    final = sft(cfg, args.data, output, args.epochs, args.batch_size, overwrite=args.overwrite)
    print(
        f"done: metrics in {output}/metrics.jsonl; model {final} (train on: forge train CONFIG model.path={final})"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from forge.config import load_config
    from forge.eval import error_verdict, evaluate

    cfg = load_config(args.config, args.overrides)
    # stdout carries the one JSON object alone (`forge eval ... | jq`): an env's own prints,
    # made in this process while it plays, go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate(
            cfg,
            args.checkpoint,
            args.episodes,
            args.tasks,
            progress=not args.no_progress,
            trajectories=args.trajectories,
        )
    print(json.dumps(result))
    verdict = error_verdict(result, cfg.env.max_error_fraction)
    if verdict:
        print(f"forge: {verdict}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from forge.export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.step, args.out)
    print(f"done: model {out} (forge eval CONFIG --checkpoint {out}; forge serve {out})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from forge.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from forge.rollout.engines.server import serve

    serve(
        args.checkpoint,
        host=args.host,
        port=args.port,
        api_key_env=args.api_key_env,
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_tokens,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        cache_tokens=args.prefix_cache_tokens,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        model_name=args.served_model_name,
        record_dir=args.record_dir,
        max_live_episodes=args.max_live_episodes,
        attn_implementation=args.attn_implementation,
        attn_setting="--attn-implementation",
        revision=args.revision,
    )
    return 0


def _configs(args: argparse.Namespace) -> int:
    from forge.builtin_configs import listing

    print(listing())
    return 0


def _envs_list(args: argparse.Namespace) -> int:
    from forge.env.check import list_envs

    print(list_envs())
    return 0


def _env_check(args: argparse.Namespace) -> int:
    from forge.env.check_process import run_check_command

    return run_check_command(args)


def _bench(args: argparse.Namespace) -> int:
    import importlib.util
    import runpy

    module = f"bench.{args.name}"
    # Benchmarks live in the repository, not the installed package: import from the cwd.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if importlib.util.find_spec("bench") is None or importlib.util.find_spec(module) is None:
        print(
            f"forge bench: no benchmark {args.name!r} (run from the repository root, which holds bench/)",
            file=sys.stderr,
        )
        return 2
    sys.argv = [module, *args.bench_args]
    runpy.run_module(module, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from forge import __version__

    parser = argparse.ArgumentParser(prog="forge", description="RL training harness for LLM agents")
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy from a YAML config")
    train.add_argument(
        "config",
        help="a built-in config's name (forge configs lists them) or a YAML file, e.g. smoke or my-run.yaml",
    )
    train.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.max_steps=20")
    train.add_argument("--dry-run", action="store_true", help="validate and print the resolved config")
    train.add_argument("--output-dir", help="where the run writes (overrides output_dir)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in the output directory (else refused)",
    )
    train.set_defaults(handler=_train)

    warm = commands.add_parser(
        "sft", help="supervised warm start on chat transcripts (loss on assistant tokens)"
    )
    warm.add_argument(
        "config", help="YAML config: its model, env (for demonstrations), train and trainer settings"
    )
    warm.add_argument(
        "overrides", nargs="*", default=[], help="dotted overrides, e.g. train.learning_rate=1e-3"
    )
    warm.add_argument("--data", help="jsonl of {'messages': [...]}; default: the env's demonstrations(tasks)")
    warm.add_argument("--output-dir", help="where the run writes (default: output_dir + '-sft')")
    warm.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    warm.add_argument("--epochs", type=int, default=1)
    warm.add_argument("--batch-size", type=int, default=16, help="transcripts per optimizer step")
    warm.set_defaults(handler=_sft)

    evaluate = commands.add_parser("eval", help="play episodes with a trained model; prints one JSON object")
    evaluate.add_argument(
        "config",
        help="the config the model was trained with (env, rollout limits): a built-in name or a YAML file",
    )
    evaluate.add_argument(
        "overrides", nargs="*", default=[], help="dotted overrides, e.g. rollout.temperature=0.7"
    )
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        help="model folder, e.g. runs/smoke/final (a run's checkpoint: forge export RUN_DIR --step N makes one), "
        "or a hub model id (org/name; revision: model.revision)",
    )
    evaluate.add_argument("--episodes", type=int, default=8, help="episodes per task")
    evaluate.add_argument("--tasks", type=int, default=16, help="how many of the env's tasks to play")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    evaluate.add_argument(
        "--trajectories",
        metavar="FILE",
        help="write every episode played to FILE (jsonl, the rows a run writes to trajectories.jsonl)",
    )
    evaluate.set_defaults(handler=_eval)

    export = commands.add_parser(
        "export", help="write a model folder (as a run's final/) from one of a run's checkpoints"
    )
    export.add_argument(
        "run_dir", help="a run's output directory (holds checkpoints/), or a checkpoint in it"
    )
    export.add_argument(
        "--step", type=int, metavar="N", help="the checkpoint of this step (default: the latest)"
    )
    export.add_argument(
        "--out", metavar="DIR", help="where the model folder goes (default RUN_DIR/exports/step-NNNNNN)"
    )
    export.set_defaults(handler=_export)

    serve = commands.add_parser("serve", help="serve a checkpoint over HTTP (token API + OpenAI API)")
    serve.add_argument(
        "checkpoint",
        help="a Hugging Face checkpoint folder, e.g. runs/smoke/final, or a hub model id (org/name, from or "
        "into the Hugging Face cache)",
    )
    serve.add_argument("--revision", default="main", help="for a hub id: the branch, tag or commit to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help="require the key environment variable NAME holds (Authorization: Bearer) on every route but "
        "/health; a run sends it with rollout.server_api_key_env: NAME",
    )
    serve.add_argument("--max-new-tokens", type=int, default=256, help="cap on tokens sampled per call")
    serve.add_argument("--max-context-tokens", type=int, default=4096, help="prompt plus sampled tokens")
    serve.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=None,
        help="prefill in forwards of at most this many tokens (as rollout.prefill_chunk_tokens; default 2048 on "
        "CPU, 16384 on a GPU; 0: one forward)",
    )
    serve.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (logprobs are of it)"
    )
    serve.add_argument("--top-p", type=float, default=1.0)
    serve.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=65536,
        help="episodes' KV kept between calls, in tokens; least recently used evicted past it",
    )
    serve.add_argument("--seed", type=int, default=0, help="sampling seed")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve.add_argument(
        "--attn-implementation",
        choices=["auto", "sdpa", "eager", "flex_attention"],
        default="auto",
        help="the model's transformers attention (as rollout.attn_implementation): auto = sdpa "
        "where the family has it, else eager",
    )
    serve.add_argument("--served-model-name", help="model name on /v1/models (default: the folder name)")
    serve.add_argument(
        "--record-dir",
        help="append each finished episode's calls, as training samples, to RECORD_DIR/episodes.jsonl",
    )
    serve.add_argument(
        "--max-live-episodes",
        type=int,
        default=1024,
        help="past this many unfinished episodes the least recently used is ended",
    )
    serve.set_defaults(handler=_serve)

    plot = commands.add_parser("plot", help="PNG charts of a run's metrics")
    plot.add_argument("run_dir", help="a run's output directory (holds metrics.jsonl)")
    plot.add_argument("--out", help="where the PNGs go (default RUN_DIR/plots)")
    plot.set_defaults(handler=_plot)

    configs = commands.add_parser("configs", help="list the built-in configs (forge train NAME)")
    configs.set_defaults(handler=_configs)

    envs = commands.add_parser("envs", help="installed environments")
    envs_commands = envs.add_subparsers(dest="envs_command", required=True)
    envs_commands.add_parser("list", help="list installed envs").set_defaults(handler=_envs_list)

    env = commands.add_parser("env", help="work with one environment")
    env_commands = env.add_subparsers(dest="env_command", required=True)
    check = env_commands.add_parser("check", help="run the env contract check")
    from forge.env.check import add_check_arguments

    add_check_arguments(check)
    check.set_defaults(handler=_env_check)

    bench = commands.add_parser("bench", help="run a benchmark from bench/ (prints JSON)")
    bench.add_argument("name", help="benchmark name, e.g. tree")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from forge.config import ConfigError
    from forge.sandbox.core import SandboxUnavailable

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides written after an option: forge train CONFIG --output-dir DIR key=value
        if not hasattr(args, "overrides") or any(arg.startswith("-") for arg in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`forge configs | head -1`): stop quietly as a program
        # killed by SIGPIPE would. Later writes, and the flush at exit, go to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT
    except ConfigError as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not Python's traceback of wherever it landed
        print("forge: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (FileNotFoundError, FileExistsError, SandboxUnavailable) as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
