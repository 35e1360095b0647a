"""docker/: the compose file and its README only name real `mailer` commands, options and
settings, and the image is built the way mailer needs (migrations at /app/migrations).

Nothing here needs Docker: the files are read and checked against `mailer.cli.cli` and
`mailer.config.VARIABLES`, so renaming a command or a variable fails this test.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest

from mailer import config
from mailer.cli import cli

try:
    import yaml
except ImportError:  # pragma: no cover - a set-up problem, not a test outcome
    pytest.fail("tests/test_docker.py needs PyYAML: add pyyaml to the dev extra", pytrace=False)

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
README = DOCKER / "README.md"

KNOWN_VARIABLES = {name for name, _, _ in config.VARIABLES}
REQUIRED_VARIABLES = {"MAILER_DATABASE_URL", "MAILER_BROKER_URL", "MAILER_SMTP_URL", "MAILER_FROM"}


# --- reading the files ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))  # resolves anchors and `<<`
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_entrypoint() -> list[str]:
    entrypoints = [args for keyword, args in dockerfile() if keyword == "ENTRYPOINT"]
    assert entrypoints, "docker/Dockerfile has no ENTRYPOINT"
    value = json.loads(entrypoints[-1])  # the exec form: a JSON list
    assert isinstance(value, list)
    return [str(v) for v in value]


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def runs_mailer_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    if isinstance(build, str):
        context, file = build, "Dockerfile"
    else:
        context, file = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    return (COMPOSE_FILE.parent / context / file).resolve() == DOCKERFILE.resolve()


def mailer_services() -> dict[str, dict[str, Any]]:
    found = {name: s for name, s in services().items() if runs_mailer_image(s)}
    assert found, "no service in docker/compose.yaml builds docker/Dockerfile"
    return found


def is_mailer(word: str) -> bool:
    return posixpath.basename(word) == "mailer"


def shell_invocations(text: str) -> list[list[str]]:
    """The argument lists of each `mailer ...` in a shell command line (`a && mailer b; c`)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    out: list[list[str]] = []
    current: list[str] | None = None
    for token in lexer:
        if token and set(token) <= set(";&|()"):
            current = None
        elif current is not None:
            current.append(token)
        elif is_mailer(token):
            current = []
            out.append(current)
    return out


def mailer_invocations(service: dict[str, Any]) -> list[list[str]]:
    """The argument lists passed to `mailer` by a service's entrypoint and command."""
    entrypoint = service.get("entrypoint")
    command = as_list(service.get("command"))
    if entrypoint is None:
        if not runs_mailer_image(service):
            return [args for word in command for args in shell_invocations(word)]
        entrypoint = dockerfile_entrypoint()
        if not command:
            return []  # the image's CMD (help)
    argv = as_list(entrypoint) + command
    if argv and is_mailer(argv[0]):
        return [argv[1:]]
    return [args for word in argv for args in shell_invocations(word)]


def compose_invocations() -> list[tuple[str, list[str]]]:
    found = [(name, args) for name, s in services().items() for args in mailer_invocations(s)]
    assert found, "docker/compose.yaml runs no mailer command"
    return found


# compose `run` options that take a value (the rest are flags such as --rm)
_RUN_VALUE_OPTIONS = {
    "-v", "--volume", "-e", "--env", "-w", "--workdir", "-u", "--user", "--name",
    "-p", "--publish", "-l", "--label", "--entrypoint", "--env-from-file", "--pull",
}  # fmt: skip


def readme_invocations() -> list[tuple[str, list[str]]]:
    """(service, mailer arguments) of each `docker compose ... run ... SERVICE ARGS` shown."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.lstrip("$ "))
            if words[:2] != ["docker", "compose"] or "run" not in words:
                continue
            rest = words[words.index("run") + 1 :]
            while rest and rest[0].startswith("-"):
                option = rest.pop(0)
                if option in _RUN_VALUE_OPTIONS:
                    rest.pop(0)
            assert rest, f"no service in README line: {line}"
            found.append((rest[0], rest[1:]))
    return found


# --- resolving commands against the click group ---------------------------------------------------


def resolve(args: list[str]) -> tuple[click.Command, list[str], click.Context]:
    """Walk `cli` down the subcommand names at the start of args (e.g. db upgrade --revision x):
    the command reached, the arguments left for it, and a context for it (parents linked)."""
    command: click.Command = cli
    ctx = click.Context(cli, info_name="mailer")
    rest = list(args)
    while isinstance(command, click.Group):
        if not rest or rest[0].startswith("-"):
            if command.invoke_without_command:
                break
            pytest.fail(f"`{ctx.command_path}` needs a subcommand: {sorted(command.commands)}")
        name = rest.pop(0)
        if name not in command.commands:
            pytest.fail(
                f"`{ctx.command_path} {name}` is not a mailer command; "
                f"`{ctx.command_path}` has {sorted(command.commands)}"
            )
        command = command.commands[name]
        ctx = click.Context(command, parent=ctx, info_name=name)
    return command, rest, ctx


def check_options(args: list[str], where: str) -> None:
    """Every option given exists on the command. Stricter than click for `mailer worker`, which
    passes unknown options on to celery: a renamed mailer option must not slip through."""
    command, rest, ctx = resolve(args)
    known = {
        opt
        for param in command.get_params(ctx)
        if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
    }
    for word in rest:
        if word == "--":
            break
        if word.startswith("--"):
            name = word.split("=", 1)[0]
        elif word.startswith("-") and len(word) > 1 and not word[1:].replace(".", "").isdigit():
            name = word[:2]
        else:
            continue
        assert name in known, (
            f"{where}: `mailer {' '.join(args)}`: {name} is not an option of "
            f"`{ctx.command_path}` (it has {sorted(known)})"
        )


def check_parses(args: list[str], where: str) -> None:
    """click parses the arguments: option values, required options and arguments."""
    command, rest, ctx = resolve(args)
    try:
        command.make_context(ctx.info_name, list(rest), parent=ctx.parent)
    except click.ClickException as exc:
        pytest.fail(f"{where}: `mailer {' '.join(args)}`: {exc.format_message()}")


# --- compose --------------------------------------------------------------------------------------


def test_compose_runs_the_expected_roles() -> None:
    invocations = {name: args for name, args in compose_invocations()}
    assert invocations.get("migrate", [])[:2] == ["db", "upgrade"]
    assert invocations.get("worker", [])[:1] == ["worker"]
    assert invocations.get("dispatcher", [])[:1] == ["dispatcher"]
    every = services()
    for name in ("worker", "dispatcher"):
        depends = every[name].get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert depends.get("migrate", {}).get("condition") == "service_completed_successfully"
    assert every["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in every["postgres"]


def test_compose_commands_are_real_mailer_commands() -> None:
    for name, args in compose_invocations():
        check_options(args, f"compose service {name}")
        check_parses(args, f"compose service {name}")


def test_compose_sets_only_known_mailer_variables() -> None:
    for name, service in services().items():
        for variable in environment(service):
            if variable.startswith("MAILER"):
                assert variable in KNOWN_VARIABLES, (
                    f"compose service {name}: {variable} is not a mailer setting "
                    f"(mailer.config.VARIABLES has {sorted(KNOWN_VARIABLES)})"
                )


def test_mailer_services_share_one_working_configuration() -> None:
    envs = {name: environment(s) for name, s in mailer_services().items()}
    first = next(iter(envs.values()))
    for name, env in envs.items():
        assert env == first, f"compose service {name}: environment differs from the others"
        missing = REQUIRED_VARIABLES - env.keys()
        assert not missing, f"compose service {name}: {sorted(missing)} not set"
    # the values parse: URLs, relay TLS mode, log level (nothing is connected to)
    settings = config.load({k: interpolate(v) for k, v in first.items()})
    assert settings.smtp.host == "mailpit" and settings.smtp.port == 1025
    assert settings.smtp.tls == "none"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url.startswith("redis://redis:")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set in the environment: the default."""
    value = re.sub(r"\$\{\w+(?::?[-?]([^}]*))?\}", lambda m: m.group(1) or "", value)
    return value.replace("$$", "$")


def test_compose_builds_from_the_repository_root() -> None:
    for name, service in mailer_services().items():
        build = service["build"]
        assert isinstance(build, dict), f"compose service {name}: build needs context and file"
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT


# --- README ---------------------------------------------------------------------------------------


def test_readme_commands_are_real_mailer_commands() -> None:
    invocations = readme_invocations()
    assert invocations, "docker/README.md shows no `docker compose ... run` command"
    mailer = mailer_services()
    for service, args in invocations:
        assert service in mailer, f"README runs `{service}`, not a mailer service of compose"
        check_options(args, "docker/README.md")


def test_readme_starts_the_compose_file() -> None:
    assert "docker compose -f docker/compose.yaml up" in README.read_text(encoding="utf-8")


# --- Dockerfile -----------------------------------------------------------------------------------


def copies() -> list[tuple[str, str]]:
    """(source, where it lands in the image) for each COPY/ADD source, with Docker's rules: a
    directory's contents go into the destination; a file goes into a destination ending in /
    (or one of several sources), else becomes it. Relative destinations start at WORKDIR."""
    workdir = "/"
    out = []
    for keyword, args in dockerfile():
        if keyword == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        elif keyword in ("COPY", "ADD"):
            *sources, dest = [w for w in shlex.split(args) if not w.startswith("--")]
            target = posixpath.join(workdir, dest)
            for source in sources:
                name = source.rstrip("/")
                if (ROOT / name).is_dir():
                    landed = target
                elif dest.endswith("/") or len(sources) > 1:
                    landed = posixpath.join(target, posixpath.basename(name))
                else:
                    landed = target
                out.append((name, posixpath.normpath(landed)))
    return out


def copied_to(source: str) -> str:
    for name, landed in copies():
        if name == source:
            return landed
    pytest.fail(f"docker/Dockerfile does not copy {source}")


def test_dockerfile_installs_editable_from_app_with_migrations_beside_the_package() -> None:
    # mailer/migrate.py: Path(mailer.__file__).parent.parent / "migrations"
    for source in ("pyproject.toml", "README.md", "mailer", "migrations"):
        landed = copied_to(source)
        assert landed == f"/app/{source}", f"docker/Dockerfile copies {source} to {landed}"
    workdir = "/"
    for keyword, args in dockerfile():
        if keyword == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        if keyword == "RUN" and "pip install" in args:
            assert re.search(r"pip install (.* )?-e \.(\s|$)", args), f"not editable: {args}"
            assert workdir == "/app", f"pip install -e . runs in {workdir}, not /app"
            break
    else:
        pytest.fail("docker/Dockerfile does not pip install the project")


def test_dockerfile_copies_files_that_exist() -> None:
    for source, _ in copies():
        assert (ROOT / source).exists(), f"docker/Dockerfile copies {source}: not in the repo"


def test_dockerfile_entrypoint_is_mailer_and_user_is_not_root() -> None:
    assert dockerfile_entrypoint() == ["mailer"]
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"


def test_dockerfile_bakes_in_no_settings() -> None:
    for keyword, args in dockerfile():
        if keyword in ("ENV", "ARG"):
            assert "MAILER_" not in args and "PASSWORD" not in args.upper(), (
                f"docker/Dockerfile sets {keyword} {args}: settings come from the environment"
            )
