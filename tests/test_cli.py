"""The CLI fails in a second on bad parameters (llm2clip.ops.preflight), never leaves an old run looking current, and
takes its task processes down with it (llm2clip.ops.lifeline): Ctrl-C, SIGTERM and kill -9."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds
from test_formats import img2dataset_shard, jpeg, karpathy

from llm2clip import prepare_data
from llm2clip.ops import cli, lifeline, preflight


def params(**overrides) -> dict:
    return {**cli.pipeline_parameters(), **cli.PROFILES["tiny"], **overrides}


def problems(env: dict | None = None, **overrides) -> list[str]:
    return preflight.run_problems(params(**overrides), {"HF_HUB_OFFLINE": "1"} if env is None else env)


# ----------------------------------------------------------------------------------------------- preflight


def test_placement_counts_are_checked_before_a_run_or_a_submit():
    """gpus=-1 used to start a local run (which ignores it) and would fail only in the cluster's format_gpu_limit."""
    assert preflight.placement_problems(params()) == []
    assert preflight.placement_problems(params(gpus=-1, train_nproc=0, train_nodes=2)) == [
        "gpus=-1: must be a whole number >= 0",
        "train_nproc=0: must be a whole number >= 1",
    ]
    with pytest.raises(SystemExit, match="bad pipeline parameter: gpus=-1: must be a whole number >= 0"):
        cli.validate_parameters(params(gpus=-1))
    with pytest.raises(SystemExit, match="cache_groups=0: must be a whole number >= 1"):
        cli.validate_parameters(params(cache_groups=0))
    with pytest.raises(SystemExit, match="bad pipeline parameter: gpus=-2"):
        cli.main(["submit", "--dry-run", "--set", "gpus=-2"])


def test_models_are_checked_before_anything_runs(tmp_path):
    assert problems() == [] and problems(llm="smollm2-135m-instruct") == []
    assert problems(llm="/nonexistent") == [
        "llm='/nonexistent': no such model directory (or use 'smollm2-135m-instruct' / 'tiny-random-llama')"
    ]
    (tmp_path / "empty").mkdir()
    assert problems(llm=str(tmp_path / "empty")) == [
        f"llm='{tmp_path / 'empty'}': the directory holds no config.json (expected a Hugging Face model directory)"
    ]
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert problems(llm=str(tmp_path / "empty")) == []
    offline = (
        "llm='acme/not-a-cached-model': a Hugging Face hub id, and the run is offline (allow_hub=False) while it is "
        "not in the local Hugging Face cache: set allow_hub=true where the hub is reachable, or pass an s3:// copy "
        "or a model directory (on a cluster under /models, with models_pvc), or 'smollm2-135m-instruct' / "
        "'tiny-random-llama'"
    )
    assert problems(llm="acme/not-a-cached-model") == [offline]
    assert problems(env={}, llm="acme/not-a-cached-model") == [offline]  # allow_hub decides, not HF_HUB_OFFLINE
    assert problems(llm="acme/not-a-cached-model", allow_hub=True) == []  # the hub decides at load time
    assert problems(llm="http://example.com/model") == [
        "llm='http://example.com/model': unsupported model location 'http://example.com/model' (a path, s3://, "
        "minio:// or a hub id org/name)"
    ]


def test_models_from_the_object_store_a_volume_or_the_hub_are_classified_as_the_loader_does(tmp_path):
    """Issue 16 item 9: llm=s3://... was refused as 'no such model directory'. Locally an s3:// copy needs the
    store's settings; on a cluster (`llm2clip submit`) the pods have them (llm2clip-config), paths under /models
    are on the models_pvc volume, and the pods' Hugging Face cache is empty, so a hub id needs allow_hub."""
    local = {"HF_HUB_OFFLINE": "1"}
    assert problems(env=local, llm="s3://models/Qwen2-0.5B") == [
        "llm='s3://models/Qwen2-0.5B': an object-store location needs MINIO_ENDPOINT, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY in the environment"
    ]
    store = {"MINIO_ENDPOINT": "h:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    assert problems(env=store, llm="s3://models/Qwen2-0.5B", pretrained="s3://models/vit.safetensors") == []
    assert problems(env=local, pretrained="s3://models/vit.safetensors") == [
        "pretrained='s3://models/vit.safetensors': an object-store location needs MINIO_ENDPOINT, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY in the environment"
    ]
    assert problems(pretrained=str(tmp_path / "vit.pt")) == [
        f"pretrained='{tmp_path / 'vit.pt'}': no such checkpoint file"
    ]
    (tmp_path / "vit.pt").write_bytes(b"weights")
    assert problems(pretrained=str(tmp_path / "vit.pt")) == []
    assert problems(pretrained="laion2b_s34b_b88k") == []  # an open_clip tag: open_clip resolves it at build time

    def cluster(**overrides) -> list[str]:
        return preflight.model_problems(params(**overrides), {}, on_cluster=True)

    assert cluster(llm="s3://models/Qwen2-0.5B", pretrained="s3://models/vit.safetensors") == []
    assert cluster(llm="/models/Qwen2-0.5B", pretrained="/models/vit-b-16.safetensors") == []
    assert cluster(llm="Qwen/Qwen2-0.5B", allow_hub=True) == []
    assert cluster(llm="Qwen/Qwen2-0.5B")[0].startswith(
        "llm='Qwen/Qwen2-0.5B': a Hugging Face hub id, and the run is offline (allow_hub=False) while the pods' "
        "Hugging Face cache is empty"
    )
    assert cluster(llm="/data/Qwen2-0.5B") == [
        "llm='/data/Qwen2-0.5B': no such model directory (or use 'smollm2-135m-instruct' / 'tiny-random-llama')"
    ]
    assert cluster(pretrained="/data/vit.pt") == [
        "pretrained='/data/vit.pt': no such checkpoint file (on a cluster, a path under /models on models_pvc, or "
        "s3://BUCKET/KEY)"
    ]
    assert cluster(models_pvc="")[0].startswith("models_pvc='': Kubeflow Pipelines fails every model-loading task")
    assert problems(llm="/models/Qwen2-0.5B")[0].startswith("llm='/models/Qwen2-0.5B': no such model directory")
    with pytest.raises(SystemExit, match=r"bad pipeline parameter: llm='Qwen/Qwen2-0.5B': a Hugging Face hub id"):
        cli.main(["submit", "--dry-run", "--set", "llm=Qwen/Qwen2-0.5B"])  # before anything is compiled or sent


def test_object_store_locations_need_their_settings_in_the_environment(monkeypatch):
    found = problems(env={"AWS_ACCESS_KEY_ID": "k"}, source="s3://bucket/shards")
    assert found == [
        "source='s3://bucket/shards': an object-store location needs MINIO_ENDPOINT, AWS_SECRET_ACCESS_KEY in the "
        "environment"
    ]
    monkeypatch.delenv("MINIO_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with pytest.raises(SystemExit, match="--store='s3://b/x': an object-store location needs MINIO_ENDPOINT"):
        cli.use_store("s3://b/x")


def test_eval_sources_must_exist(tmp_path):
    spec = f"urban=urban1k:{tmp_path / 'Urban1k'}"
    found = problems(source_options={"eval_sources": [spec, f"f=karpathy:{tmp_path / 'no.json'}"]})
    assert found == [
        f"eval_sources[0] (urban): no caption/*.txt under {tmp_path / 'Urban1k'} (the Urban-1K layout: caption/, "
        "image/)",
        f"eval_sources[0] (urban): images root {tmp_path / 'Urban1k' / 'image'} does not exist or is empty",
        f"eval_sources[1] (f): {tmp_path / 'no.json'} does not exist",
        f"eval_sources[1] (f): images root {tmp_path / 'images'} does not exist or is empty",
    ]
    assert problems(source_options={"eval_sources": [karpathy(tmp_path / "f30k")]}) == []  # used with synthetic


def test_field_names_are_checked_against_a_first_sample(tmp_path):
    src = tmp_path / "laion"
    img2dataset_shard(src, n=3)
    ev = [karpathy(tmp_path / "f30k")]
    options = {"source_format": "img2dataset", "eval_sources": ev, "short_field": "json.short_caption"}
    assert problems(source=str(src), source_options=options) == []
    found = problems(source=str(src), source_options={**options, "raw_field": "json.captions"})
    assert found == [
        f"raw_field='json.captions': matches nothing in the first sample of {src / '00000.tar'} (available: json, "
        "txt, json.url, json.short_caption, json.long_caption)"
    ]
    found = problems(source=str(src), source_options={**options, "long_field": "json.long"})
    assert found[0].startswith("long_field='json.long': matches nothing in the first sample")
    (tmp_path / "t.csv").write_text("file,text\na.jpg,a cat\n")
    table = {"source_format": "table", "images": str(tmp_path / "f30k" / "images"), "eval_sources": ev}
    assert problems(source=str(tmp_path / "t.csv"), source_options=table)[:2] == [
        f"image_column='image': not a column of {tmp_path / 't.csv'} (columns: file, text)",
        f"raw_field='caption' (the default): not a column of {tmp_path / 't.csv'} (columns: file, text)",
    ]
    table.update(image_column="file", raw_field="text")
    assert problems(source=str(tmp_path / "t.csv"), source_options=table, tune_batch_size=2, train_batch_size=2) == [
        f"tune_batch_size=2: larger than the 1 training images of source '{tmp_path / 't.csv'}' (the table's rows)",
        f"train_batch_size=2: larger than the 1 training images of source '{tmp_path / 't.csv'}' (the table's rows)",
    ]


def test_batch_sizes_are_checked_against_prepared_split_sizes(tmp_path):
    prepare_data.prepare_data(prepare_data.PrepareDataConfig(num_train=10, num_eval=4), str(tmp_path / "ds"))
    assert problems(source=str(tmp_path / "ds"), train_batch_size=10) == []
    assert problems(source=str(tmp_path / "ds"), train_batch_size=16) == [
        f"train_batch_size=16: larger than the 10 training images of source '{tmp_path / 'ds'}' (train/sizes.json)"
    ]
    assert problems(num_train=8) == [
        "train_batch_size=16: larger than the 8 training images of source 'synthetic' (num_train)"
    ]


def test_cli_refuses_bad_parameters_before_any_task_starts(tmp_path, capsys):
    t0 = time.time()
    with pytest.raises(SystemExit, match="llm='/nonexistent': no such model directory"):
        cli.main(["run", "--local", "--profile", "tiny", "--output", str(tmp_path), "--set", "llm=/nonexistent"])
    assert time.time() - t0 < 30 and not (tmp_path / "pipeline_root").exists()
    assert not (tmp_path / cli.RUN_STATUS).exists()  # the run directory was never started


def test_a_local_run_refuses_several_nodes_and_says_where_they_run(tmp_path):
    with pytest.raises(SystemExit, match=r"train_nodes=2: only 1 runs locally.*TrainJob.*llm2clip submit"):
        cli.main(["run", "--local", "--profile", "tiny", "--output", str(tmp_path), "--set", "train_nodes=2"])
    assert not (tmp_path / "pipeline_root").exists() and not (tmp_path / cli.RUN_STATUS).exists()


# ----------------------------------------------------------------------------------------------- run --help


def test_run_help_lists_every_pipeline_parameter_with_its_meaning(capsys):
    """Each parameter once, as `--set` takes it with its default, followed by its help: the config field's
    metadata["help"] where the parameter is one config field (llm2clip.params.FIELDS), else params.HELP's entry."""
    from llm2clip import params as stage_params

    with pytest.raises(SystemExit) as stop:
        cli.main(["run", "--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out.split("pipeline parameters (--set KEY=VALUE", 1)[1]
    entries = re.findall(r"^  (\w+)=.*\n((?:      .*\n?)+)", shown, re.M)
    defaults = cli.pipeline_parameters()
    assert [name for name, _ in entries] == list(defaults)
    for name, text in entries:
        meaning = stage_params.parameter_help(name)
        assert len(meaning) > 20, name
        assert " ".join(text.split()) == " ".join(meaning.split()), name
    stage, field = stage_params.FIELDS["tune_steps"]
    metadata = {f.name: f.metadata for f in dataclasses.fields(stage_params.config_class(stage))}[field]
    assert stage_params.parameter_help("tune_steps") == metadata["help"]
    assert stage_params.parameter_help("gpus") == stage_params.HELP["gpus"]


def test_shown_values_are_what_set_takes_back():
    defaults = {"s": "", "f": 5e-4, "b": False, "d": {"k": [1, "v"]}, "l": ["x y"]}
    shown = [f"{k}={cli.format_value(v)}" for k, v in defaults.items()]
    assert shown == ["s=", "f=0.0005", "b=false", 'd={"k":[1,"v"]}', 'l=["x y"]']
    assert cli.parse_overrides(shown, defaults) == defaults


# ----------------------------------------------------------------------------------------------- run directory


def test_a_new_run_clears_the_previous_results(tmp_path):
    for name in cli.RUN_RESULTS:
        (tmp_path / name).write_text("from an earlier run")
    cli.start_run_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cli.RUN_STATUS]
    assert json.loads((tmp_path / cli.RUN_STATUS).read_text())["state"] == "running"


# ----------------------------------------------------------------------------------------------- process tree

# A stand-in for the CLI under KFP's SubprocessRunner: `sh -c` with Python below it, its output piped through.
PARENT = """
import subprocess, sys
from llm2clip.ops import lifeline
with lifeline.on_stop_signal(grace_s=2):
    print("ready", flush=True)
    with subprocess.Popen(["sh", "-c", sys.argv[1] + "; true"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as task:
        for line in task.stdout:
            print(line, end="", flush=True)
"""
CHILD = f"{sys.executable} -c 'import llm2clip, time; print(\"task\", flush=True); time.sleep(300)'"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ended since the listing
        return b""


def _start(script: str, arg: str, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, arg], stdout=subprocess.PIPE, text=True, start_new_session=True, **kw
    )
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 20
    while len(lifeline.descendants(proc.pid)) < 2 and time.time() < deadline:  # sh, then python below it
        time.sleep(0.1)
    assert proc.stdout.readline().strip() == "task"  # the task's llm2clip import has started its watchdog
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_end_every_task_process(sig):
    """Started as `cmd &` from a script starts it (SIGINT ignored), the signal still stops the whole tree."""
    proc = _start(
        PARENT,
        f"{sys.executable} -c 'print(\"task\", flush=True); import time; time.sleep(300)'",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    tree = lifeline.descendants(proc.pid)
    assert len(tree) == 2 and b"time.sleep(300)" in _cmdline(tree[-1])  # `sh -c`, and the task below it
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=10) != 0
    assert not [p for p in tree if lifeline.alive(p)]


def test_stop_tree_leaves_the_exit_status_to_the_parent():
    """stop_tree must not reap: KFP's task handler reads its `sh -c` child's exit status through Popen, and a child
    reaped behind Popen's back (psutil.wait_procs does that for our own children) reads as exit status 0."""
    script = (
        "import os, subprocess\nfrom llm2clip.ops import lifeline\n"
        "child = subprocess.Popen(['sleep', '30'])\n"
        "print(lifeline.stop_tree(os.getpid(), grace_s=2) == [child.pid], child.wait(), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["True", str(-signal.SIGTERM)], out.stderr


def test_tasks_end_themselves_after_kill_9_of_the_cli():
    parent = PARENT.replace(
        "with lifeline.on_stop_signal(grace_s=2):",
        "if True:\n    import os\n    os.environ[lifeline.PARENT_ENV] = str(os.getpid())",
    )
    proc = _start(parent, CHILD)
    tree = lifeline.descendants(proc.pid)
    task = [p for p in tree if "python" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert task
    t0 = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while any(lifeline.alive(p) for p in task) and time.time() - t0 < 10:
        time.sleep(0.05)
    elapsed = time.time() - t0
    assert not [p for p in task if lifeline.alive(p)] and elapsed < lifeline.WATCH_INTERVAL_S + 1.5, elapsed
    for p in tree:  # the `sh` wrapper has no watchdog: it ends when its python child does
        with_deadline = time.time() + 5
        while lifeline.alive(p) and time.time() < with_deadline:
            time.sleep(0.05)
        assert not lifeline.alive(p)


# ----------------------------------------------------------------------------------------------- whole CLI (slow)


def _cli(output: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "llm2clip.ops.cli",
        "run",
        "--local",
        "--profile",
        "tiny",
        "--output",
        str(output),
        *args,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, **kw
    )


@pytest.mark.slow
def test_a_failed_run_says_so_and_leaves_no_old_summary(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"from": "an earlier run"}')
    src = tmp_path / "src"  # canonical layout whose every train record is broken: prepare_data fails
    for split in ("train", "eval/synthetic_short", "eval/synthetic_long"):
        (src / split).mkdir(parents=True)
        with wds.TarWriter(str(src / split / "shard-000000.tar")) as w:
            for i in range(20):
                meta = {"captions": {"short": ["", "x"] if split == "train" else ["a b", "c d"], "long": ["e f"]}}
                w.write({"__key__": f"k{i}", "jpg": jpeg(i), "json": json.dumps(meta)})
    proc = _cli(out, "--set", f"source={src}")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, log
    assert "no usable record; 20 rejected (blank caption: 20)" in log
    assert not (out / "summary.json").exists()
    status = json.loads((out / cli.RUN_STATUS).read_text())
    assert status["state"] == "failed" and "prepare-data" in status["error"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_the_real_cli_takes_its_tasks_down(tmp_path, sig):
    """Ctrl-C: the CLI stops its task and exits 130. kill -9: the task notices and ends itself."""
    # 3,000 training images: prepare_data renders for tens of seconds (the tiny profile's 64 took ~2 s, and a kill
    # after the 2 s below met an ended task once)
    proc = _cli(
        tmp_path / "run", "--set", "num_train=3000", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    # The target: prepare_data's task process (`python -m kfp.dsl.executor_main ...`, its outputs under
    # .../prepare-data/), which runs for many seconds; locate_store before it ends within a second or two.
    task, deadline = [], time.time() + 120
    while not task and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        task = [p for p in lifeline.descendants(proc.pid) if re.search(rb"executor_main.*/prepare-data/", _cmdline(p))]
    assert task, f"no prepare_data task process below the CLI; CLI exit code {proc.poll()}"
    time.sleep(2)  # the task is importing llm2clip (its watchdog)
    tree = lifeline.descendants(proc.pid)
    assert set(task) <= set(tree) and all(lifeline.alive(p) for p in task)  # the kill meets the running task
    t0 = time.time()
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=30)
    while any(lifeline.alive(p) for p in tree) and time.time() - t0 < 30:
        time.sleep(0.1)
    assert not [p for p in tree if lifeline.alive(p)], f"still running after {time.time() - t0:.1f} s"
    if sig == signal.SIGKILL:  # the watchdog's poll interval plus the task's own exit
        assert time.time() - t0 < lifeline.WATCH_INTERVAL_S + 4
    if sig == signal.SIGINT:
        assert code == 130
        assert json.loads((tmp_path / "run" / cli.RUN_STATUS).read_text())["state"] == "stopped"
    print(f"{signal.Signals(sig).name}: every task process gone {time.time() - t0:.1f} s after the signal")
