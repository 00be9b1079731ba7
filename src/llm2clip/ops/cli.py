"""The `llm2clip` command: run the whole pipeline locally through KFP's local runner, or compile it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from llm2clip.params import defaults, format_value, parameter_help, parse_overrides  # noqa: F401 (cli's API)

# Pipeline parameters per profile. "default" is the embedded default (SmolLM2-135M, under 15 minutes on 2 CPU
# cores); "tiny" is a tiny random Llama on a handful of images (tests). kfp.local runs the DAG's tasks one after
# another, but up to two iterations of a ParallelFor at once, and PyTorch gives every process all cores: two
# caching processes with 2 threads each on 2 cores embedded 96 captions in 75 s each (1 thread each: 35 s), so
# locally each cache fan-out is one task.
PROFILES: dict[str, dict] = {
    # 200 images per eval set: an R@1 of 15% has a 95% interval of about +-5 points (100 gave +-7). The centring
    # ablation is off: on a 2-core CPU without native bf16 it adds 2.5 minutes (two more stage-2 trainings) to a run
    # that is already over 15 (measured 21.2 min with 300 eval images and the ablation on, 2026-11-27).
    # 400 training images (the pipeline's default is 600): with 600 the run took 17 min 16 s on a 2-core AMD EPYC
    # without native bf16 (fp32; 2026-11-27: stage 1 190 s, caches 194 + 204 s, stage 2 87 + 84 + 178 s), over the
    # 15-minute budget; the training captions are 61% of the caching work and all of stage 2's.
    "default": {"cache_groups": 1, "num_eval": 200, "num_train": 400},
    "tiny": {
        "num_train": 64,
        "num_eval": 16,
        "llm": "tiny-random-llama",
        "tune_steps": 4,
        "tune_batch_size": 4,
        "tune_lr": 1e-3,
        "lora_r": 4,
        "cache_groups": 2,
        "train_epochs": 2,
        "train_batch_size": 16,
    },
}


def pipeline_parameters() -> dict[str, object]:
    """The pipeline's parameters with their defaults (the source of truth is the compiled signature)."""
    from llm2clip.pipelines.llm2clip_pipeline import llm2clip_pipeline

    return defaults(llm2clip_pipeline.pipeline_func)


def parameters_help() -> str:
    """`run --help`'s list of pipeline parameters in the pipeline's order: each as `--set` takes it, with the
    pipeline's default and the profiles that change it, then what it means (llm2clip.params.parameter_help: the
    config field's metadata, or params.HELP for a parameter that is no single config field)."""
    values = pipeline_parameters()
    width = max(min(shutil.get_terminal_size().columns, 120) - 2, 40)
    out = ["pipeline parameters (--set KEY=VALUE; shown with the pipeline's defaults):"]
    for name, default in values.items():
        profiles = ", ".join(f"{p} {format_value(v[name])}" for p, v in PROFILES.items() if name in v)
        out.append(f"  {name}={format_value(default)}" + (f"  (--profile {profiles})" if profiles else ""))
        out += textwrap.wrap(
            parameter_help(name),
            width,
            initial_indent=" " * 6,
            subsequent_indent=" " * 6,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join(out)


class ShowRunHelp(argparse.Action):
    """`run --help`: the options, then every pipeline parameter (importing the pipeline, and with it kfp, only
    when the list is asked for)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace, values, option_string=None) -> None:
        parser.epilog = parameters_help()
        parser.print_help()
        parser.exit()


def validate_parameters(params: dict[str, object]) -> None:
    """Check the stage configs before starting any task, so a bad value fails in a second, not mid-run."""
    from llm2clip import devices
    from llm2clip import params as stage_params
    from llm2clip.ops import preflight

    try:
        stage_params.stage_configs(params)
        devices.resolve_device(params["device"])  # "cuda" on a machine without a GPU fails here, not in a task
        for problem in preflight.placement_problems(params):
            raise ValueError(problem)
        if params["train_nodes"] != 1:  # a TrainJob needs Kubeflow Trainer; locally stage 2 is one process tree
            raise ValueError(
                f"train_nodes={params['train_nodes']!r}: only 1 runs locally; more nodes run on a cluster through "
                "a Kubeflow Trainer TrainJob (llm2clip submit --set train_nodes=N)"
            )
        preflight.check_run(params)  # models, object-store settings, paths, field names, batch vs split sizes
    except ValueError as e:
        raise SystemExit(f"bad pipeline parameter: {e}") from None


def use_store(uri: str) -> None:
    """Check the store is reachable and writable before any task starts, then hand it to every task."""
    from llm2clip import artifacts, storage
    from llm2clip.ops import preflight

    problems = preflight.object_store_problems("--store", uri, os.environ)
    if problems:
        raise SystemExit(problems[0])
    try:
        storage.split_uri(uri)
        probe = storage.join(uri, ".llm2clip-probe")
        storage.write_bytes(probe, b"ok")
        storage.delete(probe)
    except (ValueError, RuntimeError, PermissionError, FileNotFoundError, ConnectionError, TimeoutError) as e:
        raise SystemExit(f"--store {uri}: {e}") from None
    os.environ[artifacts.STORE_ENV] = uri


def headline(summary: dict) -> str:
    from llm2clip.report import headline as text

    return text(summary)


# What a finished run leaves in its output directory; removed when the next run starts, so a failed run can never
# leave an earlier run's results looking current. status.json says how the latest run went.
RUN_RESULTS = ("summary.json", "report.html", "report.md", "retrieval_r1.png")
RUN_STATUS = "status.json"


def start_run_dir(output: Path) -> None:
    """Clear the previous run's results from `output` and mark the run as running."""
    output.mkdir(parents=True, exist_ok=True)
    for name in RUN_RESULTS:
        (output / name).unlink(missing_ok=True)
    write_status(output, "running")


def write_status(output: Path, state: str, error: str | None = None) -> None:
    status = {"state": state, "time_unix": time.time(), **({"error": error} if error else {})}
    (output / RUN_STATUS).write_text(json.dumps(status, indent=2))


def run_local(output: Path, profile: str, overrides: dict[str, object]) -> dict:
    """Run the pipeline with kfp.local.SubprocessRunner in this environment; returns summary.json's content."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from kfp import local

    from llm2clip.pipelines.llm2clip_pipeline import llm2clip_pipeline

    params = {**pipeline_parameters(), **PROFILES[profile], **overrides}
    validate_parameters(params)
    start_run_dir(output)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(output / "pipeline_root"),
        workspace_root=str(output / "workspace"),
        enable_caching=False,
    )
    print(f"running the llm2clip pipeline locally (profile {profile}) into {output}", flush=True)
    t0 = time.time()
    result = llm2clip_pipeline(**params)
    wall = time.time() - t0
    evaluation = Path(result.output.path)
    for name in ("report.html", "report.md", "retrieval_r1.png"):
        shutil.copy(evaluation / name, output / name)
    summary = json.loads((evaluation / "summary.json").read_text())
    summary["report"] = str((output / "report.html").resolve())
    summary["timings_s"]["pipeline_wall"] = wall
    summary["parameters"] = params
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The whole `llm2clip` parser, subcommands included (tests/test_docs.py parses the documented commands)."""
    parser = argparse.ArgumentParser(prog="llm2clip", description="LLM2CLIP as a Kubeflow Pipelines v2 workflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the whole pipeline",
        description="Run the whole LLM2CLIP pipeline.",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("-h", "--help", action=ShowRunHelp, help="show this help and every pipeline parameter, then exit")
    run.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="run on this machine through kfp.local.SubprocessRunner (required for now)",
    )
    run.add_argument("--output", type=Path, default=Path("runs/latest"), help="output directory (default runs/latest)")
    run.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="default",
        help="default: SmolLM2-135M on the synthetic set; tiny: a tiny random Llama (tests)",
    )
    run.add_argument(
        "--store",
        default=None,
        metavar="s3://BUCKET/PREFIX",
        help="keep shards, the embedding cache and checkpoints in an S3/MinIO store; endpoint and credentials "
        "come from MINIO_ENDPOINT, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pipeline parameter, e.g. --set train_epochs=5 (repeatable)",
    )
    comp = sub.add_parser("compile", help="write the compiled pipeline YAML", description="Compile the pipeline.")
    comp.add_argument("--output", type=Path, default=None, help="where to write (default: pipelines/llm2clip.yaml)")
    bench = sub.add_parser(
        "benchmark",
        help="measure caching, streaming, stage-2 speed and memory; write JSON",
        description="Caption caching (ours vs the official LLM2CLIP recipe, its batching in our "
        "dtype, naive padding, and a token-budget sweep; interleaved rounds, per-round ratios), "
        "shard streaming (S3 vs local), stage-2 training (images/s, data-wait share, cached vs "
        "online LLM), stage-2 peak memory on 1x and 10x the images, and on cuda the GPU suite "
        "(llm2clip.benchmarks.gpu).",
    )
    bench.add_argument("--output", type=Path, default=Path("runs/benchmark.json"), help="JSON file to write")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of stage 2 and the GPU suite")
    bench.add_argument(
        "--only",
        default=None,
        metavar="PARTS",
        help="comma-separated subset of caching,streaming,stage2,memory,gpu (default: all but gpu; on cuda all)",
    )
    bench.add_argument("--llm", default="smollm2-135m-instruct", help="caption encoder (default: the embedded LLM)")
    bench.add_argument("--captions", type=int, default=32, help="captions of the mix every caching variant embeds")
    bench.add_argument("--naive-captions", type=int, default=2, help="captions for naive padding (a prefix)")
    bench.add_argument("--fixed-length", type=int, default=512, help="padding length of the naive variant")
    bench.add_argument("--repeats", type=int, default=3, help="interleaved rounds (every variant once per round)")
    bench.add_argument("--sweep-max-tokens", default="1024,2048,8192", help="token budgets to sweep (comma)")
    bench.add_argument("--sweep-max-batch", default="256", help="max captions per batch to sweep (comma-separated)")
    bench.add_argument("--stream-images", type=int, default=1000, help="images for the streaming benchmark")
    bench.add_argument("--no-streaming", action="store_true", help="leave out the streaming benchmark")
    bench.add_argument("--stage2-images", type=int, default=500, help="training images of stage 2 (memory: also 10x)")
    bench.add_argument("--stage2-image-size", type=int, default=64, help="side of the synthetic training images")
    bench.add_argument("--stage2-model", default=None, help="vision tower (open_clip config; default: train_clip's)")
    bench.add_argument("--stage2-epochs", type=int, default=2, help="epochs of the stage-2 throughput run")
    bench.add_argument("--batch-size", type=int, default=64, help="stage-2 batch (training and memory runs)")
    bench.add_argument("--workers", type=int, default=None, help="stage-2 DataLoader workers (default: train_clip's)")
    bench.add_argument("--online-batch", type=int, default=32, help="batch of the cached-vs-online steps")
    bench.add_argument("--online-rounds", type=int, default=3, help="interleaved cached/online rounds")
    bench.add_argument("--online-steps", type=int, default=2, help="steps of each variant per round")
    bench.add_argument("--gpu-smoke", action="store_true", help="the GPU suite on tiny shapes (runs on a CPU)")
    bench.add_argument("--gpu-time-limit", type=float, default=280.0, help="seconds for the whole GPU suite")
    from llm2clip.ops import bucket, submit  # their own subcommands: `llm2clip storage ...`, `llm2clip submit ...`

    bucket.add_parser(sub)
    submit.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llm2clip.ops import bucket, submit

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "storage":
        return bucket.run(args)
    if args.command == "submit":
        return submit.run(args)

    if args.command == "benchmark":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        from llm2clip.benchmarks.suite import PARTS, Stage2BenchConfig, default_parts, run_benchmarks

        try:
            sweep_tokens = [int(x) for x in args.sweep_max_tokens.split(",")]
            sweep_batch = [int(x) for x in args.sweep_max_batch.split(",")]
        except ValueError:
            raise SystemExit("--sweep-max-tokens and --sweep-max-batch take comma-separated integers") from None
        sizes = [args.captions, args.naive_captions, args.fixed_length, args.stream_images, args.repeats]
        if min(sizes + sweep_tokens + sweep_batch) < 1:
            raise SystemExit("benchmark sizes must be >= 1")
        parts = args.only.split(",") if args.only else list(default_parts(args.device))
        if set(parts) - set(PARTS):
            raise SystemExit(
                f"--only {args.only}: unknown part(s) {sorted(set(parts) - set(PARTS))} (known: {','.join(PARTS)})"
            )
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); run "
                "on a GPU node, or --device cpu (the GPU suite on tiny shapes: --only gpu --gpu-smoke)"
            )
        if "gpu" in parts and args.device == "cpu" and not args.gpu_smoke:
            raise SystemExit("the GPU suite (--only gpu) needs --device cuda, or --gpu-smoke for tiny shapes on a CPU")
        try:
            stage2 = Stage2BenchConfig(
                images=args.stage2_images,
                image_size=args.stage2_image_size,
                epochs=args.stage2_epochs,
                batch_size=args.batch_size,
                workers=args.workers,
                llm=args.llm,
                online_batch=args.online_batch,
                online_rounds=args.online_rounds,
                online_steps=args.online_steps,
                device=args.device,
                **({"model": args.stage2_model} if args.stage2_model else {}),
            )
        except ValueError as e:
            raise SystemExit(f"bad benchmark setting: {e}") from None
        args.output.parent.mkdir(parents=True, exist_ok=True)

        def save(result: dict) -> None:  # after every part: a later failure keeps the earlier numbers
            args.output.write_text(json.dumps(result, indent=2))

        run_benchmarks(
            args.llm,
            args.captions,
            args.naive_captions,
            args.fixed_length,
            args.stream_images,
            args.repeats,
            sweep_tokens,
            sweep_batch,
            streaming=not args.no_streaming,
            parts=parts,
            stage2=stage2,
            gpu_smoke=args.gpu_smoke,
            gpu_time_limit_s=args.gpu_time_limit,
            save=save,
        )
        print(f"wrote {args.output}")
        return 0

    if args.command == "compile":
        from llm2clip.pipelines.llm2clip_pipeline import COMPILED, compile_pipeline

        print(compile_pipeline(args.output or COMPILED))
        return 0
    from llm2clip.ops import lifeline

    overrides = parse_overrides(args.overrides, pipeline_parameters())
    if args.store:
        use_store(args.store)
    try:
        with lifeline.on_stop_signal():
            summary = run_local(args.output, args.profile, overrides)
    except lifeline.Stopped as e:
        write_status(args.output, "stopped", str(e))
        print(f"llm2clip: run {e}; no results in {args.output}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        if (args.output / RUN_STATUS).exists():  # the run had started: say so where its results would be
            write_status(args.output, "failed", str(e))
        raise
    write_status(args.output, "succeeded")
    print()
    print(headline(summary))
    print(f"\nreport:  {summary['report']}\nsummary: {(args.output / 'summary.json').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
