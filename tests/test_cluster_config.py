"""cluster.yaml and cluster.local.yaml: valid for Ray's cluster launcher, every command they run
refers to options, entry points, extras and files that exist, and the cluster stays private
(token auth, dashboard and MLflow on the private IP). Offline, a few seconds.

Each shell line is split into simple commands; ``$(...)`` becomes ``@SUBST@`` (its body is
checked as a line of its own) and ``$VAR`` / ``${VAR...}`` becomes ``@VAR@`` before shlex.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import io
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import fillout_defaults, prepare_config, validate_config

from evl_platform.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ("cluster.yaml", "cluster.local.yaml")
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
PROJECT = re.compile(r"(?:~|@HOME@)/evl-platform(?:/([^\s'\"]*))?")
ENV_FILE = "~/.evl-platform.env"
AUTH_TOKEN = "~/.ray/auth_token"
HEAD_IP = "@EVL_HEAD_IP@"
# Where checkpoints and MLflow artifacts go: the bucket on AWS, the shared NFS mount on-premise.
SHARED_PREFIX = {"cluster.yaml": "s3://@EVL_BUCKET@/", "cluster.local.yaml": "@EVL_SHARED@/"}
KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{"}
WRAPPERS = {"nohup", "sudo", "exec"}


def load(name: str) -> dict:
    """A cluster file of the repository, as `ray up` reads it."""
    return yaml.safe_load((REPO / name).read_text())


def pyproject() -> dict:
    """The parsed pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned() -> set[str]:
    """Normalised names of the packages constraints.txt pins."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(line.split("==")[0]) for line in lines if "==" in line}


def env_names() -> set[str]:
    """The variables cluster.env defines."""
    return set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (REPO / "cluster.env").read_text(), re.M))


# ---------------------------------------------------------------- shell lines -> commands


@dataclass(frozen=True)
class Command:
    """One simple command: its words (redirections and keywords removed), the file it
    redirects its output to, and whether it runs inside the project (after ``cd``)."""

    argv: tuple[str, ...]
    writes: str | None
    in_project: bool


def _closing(text: str, start: int, opening: str, closing: str) -> int:
    """Index of the bracket closing the one before ``start``, skipping quoted text."""
    depth, quote, i = 1, None, start
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == opening:
            depth += 1
        elif c == closing:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {opening!r} in {text!r}")


def split_line(line: str) -> tuple[list[str], list[str]]:
    """The simple commands of a shell line (substituted) and the bodies of its ``$(...)``."""
    segments, bodies, out, quote, i = [], [], "", None, 0
    while i < len(line):
        c, nxt = line[i], line[i + 1 : i + 2]
        if quote == "'":
            quote = None if c == "'" else quote
            out += c
        elif c == "$" and nxt == "(":
            end = _closing(line, i + 2, "(", ")")
            bodies.append(line[i + 2 : end])
            out, i = out + "@SUBST@", end
        elif c == "$" and nxt == "{":
            end = _closing(line, i + 2, "{", "}")
            out, i = out + "@" + re.match(r"\w*", line[i + 2 :])[0] + "@", end
        elif c == "$" and re.match(r"[\w!?$]", nxt):
            name = re.match(r"[A-Za-z_]\w*|.", line[i + 1 :])[0]
            out, i = out + f"@{name}@", i + len(name)
        elif quote == '"':
            quote = None if c == '"' else quote
            out += c
        elif c in "'\"":
            quote = c
            out += c
        elif c in ";|()\n" or (c == "&" and not out.rstrip().endswith(">") and nxt != ">"):
            segments.append(out)
            out = ""
            i += 1 if line[i : i + 2] in ("&&", "||") else 0
        else:
            out += c
        i += 1
    return [s for s in segments + [out] if s.strip()], bodies


def to_command(segment: str, in_project: bool) -> Command | None:
    """A simple command without redirections, leading keywords, assignments and wrappers
    (``sudo``, ``nohup``, ``timeout N``); ``None`` for a test, ``fi``, ``done`` or nothing."""
    words, argv, writes = shlex.split(segment), [], None
    while words:
        word = words.pop(0)
        redirect = re.fullmatch(r"(\d*)(>>|>|<)(&\d+)?(.*)", word)
        if redirect:
            target = redirect[4] or ("" if redirect[3] else words.pop(0))
            writes = target if ">" in redirect[2] and target else writes
        else:
            argv.append(word)
    while argv and (argv[0] in KEYWORDS | WRAPPERS or re.fullmatch(r"\w+=.*", argv[0])):
        argv.pop(0)
    if argv[:1] == ["timeout"]:
        argv = argv[2:]
    if not argv or argv[0] in {"fi", "done", "}", "[", "test", "true", "false"}:
        return None
    return Command(tuple(argv), writes, in_project)


def commands(line: str) -> list[Command]:
    """Every simple command of a shell line, those of its ``$(...)`` and ``bash -c`` included."""
    segments, bodies = split_line(line)
    found, in_project = [], False
    for segment in segments:
        command = to_command(segment, in_project)
        if command is None:
            continue
        if command.argv[0] == "cd":
            in_project = bool(PROJECT.fullmatch(command.argv[1]))
        if command.argv[:2] == ("bash", "-c"):
            found += commands(command.argv[2])
        if command.argv[:3] == ("ray", "job", "submit") and "--" in command.argv:
            found += commands(" ".join(command.argv[command.argv.index("--") + 1 :]))
        found.append(command)
    return found + [c for body in bodies for c in commands(body)]


# ---------------------------------------------------------------- checks


def _click_problems(group: click.Group, argv: tuple[str, ...]) -> list[str]:
    command, args, path = group, list(argv[1:]), [argv[0]]
    while isinstance(command, click.Group):
        if not args or command.get_command(None, args[0]) is None:
            return [f"`{' '.join(argv)}`: no subcommand {args[:1]} in `{' '.join(path)}`"]
        path.append(args[0])
        command = command.get_command(None, args.pop(0))
    try:
        command.make_context(" ".join(path), args)
    except click.ClickException as error:
        return [f"`{' '.join(argv)}`: {error.format_message()}"]
    return []


def _evl_problems(command: Command) -> list[str]:
    if command.argv[0] not in pyproject()["project"]["scripts"]:
        return [f"`{command.argv[0]}` is not a [project.scripts] entry point"]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(command.argv[1:])
    except SystemExit as stop:
        if stop.code:
            return [f"`{' '.join(command.argv)}`: evl-platform rejects these arguments"]
    files = [a for a in command.argv[1:] if a.endswith(".yaml")]
    return [
        f"`{' '.join(command.argv)}`: no {f} in the repository"
        for f in files
        if not (REPO / f).is_file()
    ]


def _pip_problems(command: Command) -> list[str]:
    args, targets, constraints, problems = list(command.argv[2:]), [], [], []
    while args:
        arg = args.pop(0)
        if arg in ("-c", "--constraint"):
            constraints.append(args.pop(0))
        elif arg in ("-e", "--editable"):
            targets.append(args.pop(0))
        elif arg.startswith("-"):
            problems.append(f"`{' '.join(command.argv)}`: unexpected pip option {arg}")
        else:
            targets.append(arg)
    if constraints != ["constraints.txt"] or not command.in_project:
        problems.append(f"`{' '.join(command.argv)}`: not `-c constraints.txt` in the project")
    extras = pyproject()["project"]["optional-dependencies"]
    for target in targets:
        path, _, names = target.partition("[")
        if path != ".":
            problems.append(f"`{' '.join(command.argv)}`: installs {target}, not the project")
        for extra in filter(None, names.rstrip("]").split(",")):
            if extra not in extras:
                problems.append(f"`{' '.join(command.argv)}`: no extra [{extra}] in pyproject")
                continue
            loose = {canonicalize_name(Requirement(r).name) for r in extras[extra]} - pinned()
            problems += [f"extra [{extra}]: {name} not pinned in constraints.txt" for name in loose]
    return problems


def _python_problems(command: Command) -> list[str]:
    """``python -c CODE``: the code compiles and its imports exist."""
    code = command.argv[command.argv.index("-c") + 1]
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            if missing:
                return [f"`python -c`: {node.module} has no {', '.join(missing)}"]
    return []


def _file_problems(command: Command) -> list[str]:
    """Files of the project a command reads (not the link `ln` makes, folders `mkdir` makes)."""
    words = command.argv[1:-1] if command.argv[0] == "ln" else command.argv[1:]
    if command.argv[0] in ("mkdir", "cd"):
        words = ()
    paths = [m[1] or "." for word in words for m in PROJECT.finditer(word)]
    return [
        f"`{' '.join(command.argv)}` reads ~/evl-platform/{p}: not in the repository"
        for p in paths
        if not (REPO / p).exists()
    ]


def command_problems(config: dict) -> list[str]:
    """What is wrong with the commands of a cluster config (empty: nothing)."""
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import cli as ray_cli

    problems = []
    for key in COMMAND_KEYS:
        for line in config.get(key) or []:
            syntax = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
            if syntax.returncode:
                problems.append(f"{key}: bash cannot parse `{line}`: {syntax.stderr.strip()}")
                continue
            for command in commands(line):
                program = Path(command.argv[0]).name
                if program == "ray":
                    problems += _click_problems(ray_cli, command.argv)
                elif program == "mlflow":
                    problems += _click_problems(mlflow_cli, command.argv)
                elif program == "evl-platform":
                    problems += _evl_problems(command)
                elif command.argv[:2] == ("pip", "install"):
                    problems += _pip_problems(command)
                elif program.startswith("python") and "-c" in command.argv:
                    problems += _python_problems(command)
                problems += _file_problems(command)
    return problems


def file_mount_problems(config: dict) -> list[str]:
    """The project is mounted from the repository root, every other local source exists, the
    auth token is the user's own ~/.ray/auth_token."""
    mounts = config.get("file_mounts") or {}
    problems = (
        [] if mounts.get("~/evl-platform") == "." else ["~/evl-platform is not mounted from ."]
    )
    for remote, local in mounts.items():
        if remote == AUTH_TOKEN or local == AUTH_TOKEN:
            if (remote, local) != (AUTH_TOKEN, AUTH_TOKEN):
                problems.append(f"auth token mount {remote}: {local}, not {AUTH_TOKEN} both sides")
        elif not (REPO / local).exists():
            problems.append(f"file_mounts {remote}: {local} is not in the repository")
    problems += [
        f"rsync_filter {f}: not in the repository"
        for f in config.get("rsync_filter") or []
        if not (REPO / f).is_file()
    ]
    return problems


def _all_commands(config: dict, keys: tuple[str, ...]) -> list[Command]:
    return [c for key in keys for line in config.get(key) or [] for c in commands(line)]


def _later(word: str) -> str:
    """A word as the shell sees it when the environment file is sourced: quoted ``$VAR``
    substituted like the rest."""
    return re.sub(r"\$\{(\w+)[^}]*\}|\$(\w+)", lambda m: f"@{m[1] or m[2]}@", word)


def _option(command: Command, *names: str) -> str | None:
    """The value of an option given as ``--name value`` or ``--name=value``."""
    for i, word in enumerate(command.argv):
        for name in names:
            if word == name and i + 1 < len(command.argv):
                return command.argv[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def _environment(config: dict, role: str) -> set[str]:
    """The words written into the environment file on a head or worker node, ``$VAR`` as
    ``@VAR@``."""
    keys = ("setup_commands", f"{role}_setup_commands")
    writes = [c for c in _all_commands(config, keys) if c.writes == ENV_FILE]
    return {_later(word) for c in writes if c.argv[0] in ("printf", "echo") for word in c.argv}


def _auth_problems(config: dict) -> list[str]:
    """Token auth on head and workers: the environment file says so and `ray start` sources it."""
    problems = []
    if re.search(r"RAY_AUTH_MODE=(?!token\b)", yaml.safe_dump(config)):
        problems.append("RAY_AUTH_MODE set to something else than token")
    for role in ("head", "worker"):
        if "RAY_AUTH_MODE=token" not in _environment(config, role):
            problems.append(f"{role}: RAY_AUTH_MODE=token is not written into {ENV_FILE}")
        lines = config.get(f"{role}_start_ray_commands") or []
        starts = [x for x in lines if any(c.argv[:2] == ("ray", "start") for c in commands(x))]
        for line in starts or [""]:
            if ENV_FILE not in [c.argv[1] for c in commands(line) if c.argv[0] in (".", "source")]:
                problems.append(f"{role}: `ray start` runs without sourcing {ENV_FILE}")
    return problems


def _binding_problems(config: dict, prefix: str) -> list[str]:
    """Dashboard and MLflow on the head's private IP (Ray's node IP on the head, the
    autoscaler's $RAY_HEAD_IP on workers), MLflow's hosts and artifacts."""
    problems = []
    ip_from = {"head": "export EVL_HEAD_IP=@SUBST@", "worker": "export EVL_HEAD_IP=@RAY_HEAD_IP@"}
    for role, assignment in ip_from.items():
        if assignment not in _environment(config, role):
            problems.append(f"{role}_setup_commands do not set EVL_HEAD_IP to the private IP")
    if "get_node_ip_address" not in " ".join(config.get("head_setup_commands") or []):
        problems.append("the head's EVL_HEAD_IP is not Ray's node IP (get_node_ip_address)")
    head = _all_commands(config, ("head_start_ray_commands",))
    ray_heads = [c for c in head if c.argv[:2] == ("ray", "start") and "--head" in c.argv]
    mlflows = [c for c in head if Path(c.argv[0]).name == "mlflow" and c.argv[1:2] == ("server",)]
    if [_option(c, "--dashboard-host") for c in ray_heads] != [HEAD_IP]:
        problems.append(f"the dashboard is not bound to {HEAD_IP}")
    if [_option(c, "--host", "-h") for c in mlflows] != [HEAD_IP]:
        problems.append(f"MLflow is not bound to {HEAD_IP}")
    for server in mlflows:
        allowed = (_option(server, "--allowed-hosts") or "").split(",")
        if "*" in allowed or f"{HEAD_IP}:{_option(server, '--port')}" not in allowed:
            problems.append(f"MLflow --allowed-hosts {allowed}: not the private IP and localhost")
        if not (_option(server, "--artifacts-destination") or "").startswith(prefix):
            problems.append(f"MLflow artifacts are not under {prefix}")
    return problems


def security_problems(config: dict, name: str) -> list[str]:
    """Token auth on every node, nothing bound to all interfaces, dashboard and MLflow on the
    head's private IP, storage and artifacts where every node reaches them, and every
    ``$EVL_*`` a command uses defined (empty: nothing wrong)."""
    prefix = SHARED_PREFIX[name]
    problems = ["0.0.0.0 in the config"] if "0.0.0.0" in yaml.safe_dump(config) else []
    problems += _auth_problems(config) + _binding_problems(config, prefix)
    written = _environment(config, "head") | _environment(config, "worker")
    if not any(w.startswith("EVL_PLATFORM_STORAGE=" + prefix) for w in written):
        problems.append(f"EVL_PLATFORM_STORAGE is not under {prefix}")
    assigned = {w.removeprefix("export ").split("=")[0] for w in written if "=" in w}
    words = " ".join(_later(" ".join(c.argv)) for c in _all_commands(config, COMMAND_KEYS))
    unknown = set(re.findall(r"@(EVL_\w+)@", words)) - env_names() - assigned
    return problems + [f"${v} is neither in cluster.env nor set up" for v in sorted(unknown)]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_accepts_the_config(name: str) -> None:
    config = load(name)
    validate_config(config)  # the raw file
    # what `ray up` validates: merged with Ray's defaults (and, on-premise, the local node
    # type). prepare_config of the AWS file is left out: the AWS provider belongs to `ray up`.
    validate_config(
        prepare_config(config) if name == "cluster.local.yaml" else fillout_defaults(config)
    )


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_commands_refer_to_what_exists(name: str) -> None:
    assert command_problems(load(name)) == []


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_file_mounts_come_from_the_repository(name: str) -> None:
    assert file_mount_problems(load(name)) == []


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_is_private_and_shares_its_storage(name: str) -> None:
    assert "0.0.0.0" not in (REPO / name).read_text()  # comments included
    assert security_problems(load(name), name) == []


def test_cluster_env_names_the_bucket_once() -> None:
    assert {"EVL_BUCKET", "EVL_SHARED", "EVL_EFS_ID", "EVL_MLFLOW_DB_URI"} <= env_names()
    lines = [line for name in CLUSTER_FILES for line in (REPO / name).read_text().splitlines()]
    assert not [line for line in lines if re.search(r"s3://(?!\$EVL_BUCKET)", line)]


def _mutated(name: str, key: str, old: str, new: str) -> dict:
    config = copy.deepcopy(load(name))
    lines = config[key]
    hits = [i for i, line in enumerate(lines) if old in line]
    assert hits, f"{old!r} not in {key}"
    lines[hits[0]] = lines[hits[0]].replace(old, new)
    return config


SETUP, START_HEAD, START_WORKER = (
    "setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.mark.parametrize(
    ("key", "old", "new", "expected"),
    [
        (START_HEAD, "--dashboard-host", "--dashbord-host", "--dashbord-host"),
        (START_HEAD, "--artifacts-destination", "--artifact-destination", "--artifact-dest"),
        (START_WORKER, "--address", "--adress", "--adress"),
        (SETUP, "~/evl-platform/cluster.env", "~/evl-platform/cluster.envv", "cluster.envv"),
        (SETUP, ".[cluster]", ".[clusters]", "no extra [clusters]"),
        (SETUP, "-c constraints.txt", "", "constraints.txt"),
        (SETUP, "evl-platform --version", "evl-platform train --num-workerz 2", "rejects"),
        (SETUP, "'set +a'", "'set +a", "bash cannot parse"),
    ],
)
def test_a_broken_command_is_caught(key: str, old: str, new: str, expected: str) -> None:
    problems = command_problems(_mutated("cluster.yaml", key, old, new))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("key", "old", "new", "expected"),
    [
        (START_HEAD, '--dashboard-host="$EVL_HEAD_IP"', "--dashboard-host=0.0.0.0", "0.0.0.0"),
        (START_HEAD, '--host "$EVL_HEAD_IP"', "--host 127.0.0.1", "MLflow is not bound"),
        (START_HEAD, "localhost:*,", "*,", "--allowed-hosts"),
        (SETUP, "'RAY_AUTH_MODE=token'", "'RAY_AUTH_MODE=disabled'", "RAY_AUTH_MODE"),
        (START_WORKER, ". ~/.evl-platform.env &&", "", "worker: `ray start`"),
        ("worker_setup_commands", "$RAY_HEAD_IP", "localhost", "EVL_HEAD_IP"),
        (START_HEAD, "s3://$EVL_BUCKET/mlflow", "/home/ubuntu/mlflow", "artifacts"),
        (SETUP, "$EVL_SHARED/cache", "$EVL_SHARD/cache", "$EVL_SHARD"),
    ],
)
def test_an_unsafe_change_is_caught(key: str, old: str, new: str, expected: str) -> None:
    problems = security_problems(_mutated("cluster.yaml", key, old, new), "cluster.yaml")
    assert any(expected in p for p in problems), problems


def test_a_missing_mount_source_is_caught() -> None:
    config = copy.deepcopy(load("cluster.yaml"))
    config["file_mounts"]["~/evl-platform"] = "./no-such-dir"
    config["file_mounts"]["/etc/token"] = AUTH_TOKEN
    problems = file_mount_problems(config)
    assert any("no-such-dir" in p for p in problems) and any("auth token" in p for p in problems)


def test_docs_commands_parse() -> None:
    """The evl-platform, ray and pip lines of docs/cluster.md run as written."""
    text = (REPO / "docs" / "cluster.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    lines = [line.split(" #")[0] for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line.strip() and not line.startswith("#")]
    assert {"evl-platform", "ray"} <= {c.argv[0] for line in lines for c in commands(line)}
    config = {"setup_commands": [f"cd ~/evl-platform && {line}" for line in lines]}
    assert command_problems(config) == []


def test_splitting_handles_substitutions_quotes_and_redirections() -> None:
    line = "a=$(b 'c;d' | e) && f \"$G:1\" > out 2>&1; h ${I:-j} < in & k || (l)"
    assert [c.argv for c in commands(line)] == [
        ("f", "@G@:1"),
        ("h", "@I@"),
        ("k",),
        ("l",),
        ("b", "c;d"),
        ("e",),
    ]
    assert commands(line)[0].writes == "out"
