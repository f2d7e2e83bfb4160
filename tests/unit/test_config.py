"""fleetd.toml validation: the example loads, and every user mistake is named by key path."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fleetd import config, config_errors
from fleetd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "fleetd.toml"


def model_toml(name: str = "a", engine: str = "vllm", extra: str = "") -> str:
    """One [[models]] table that is valid on its own, plus ``extra`` lines."""
    head = f'[[models]]\nname = "{name}"\nengine = "{engine}"\nmodel = "org/{name}"\nvram_gib = 4\n'
    return head + textwrap.dedent(extra)


def problems_of(tmp_path: Path, text: str | bytes) -> tuple[config_errors.Problem, ...]:
    path = tmp_path / "fleetd.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load_config(path)
    assert info.value.source == str(path)
    return info.value.problems


# --- the example ---------------------------------------------------------------------


def test_example_loads_with_the_numbers_it_states() -> None:
    cfg = config.load_config(EXAMPLE)
    assert [m.name for m in cfg.models] == [
        "mimo-vl",
        "deepcoder:14b",
        "qwen2.5vl:3b",
        "deepseek-r1:32b",
        "mixtral:8x22b",
    ]
    mimo = cfg.model_named("mimo-vl")
    assert mimo is not None
    assert mimo.engine is config.Engine.VLLM
    assert mimo.model == "XiaomiMiMo/MiMo-VL-7B-RL"
    assert (mimo.vram_gib, mimo.overhead_gib) == (14.0, 2.0)
    assert mimo.budget_mib == 16384  # 14 + 2 GiB: the whole 16 GiB card
    assert (mimo.replicas, mimo.priority) == (1, 100)
    assert mimo.preferred_gpus == (0,)
    assert mimo.max_model_len == 16384
    assert mimo.engine_args == ("--limit-mm-per-prompt", '{"image": 4, "video": 0}')
    assert mimo.capabilities == (
        config.Capability.VISION,
        config.Capability.CHAT,
        config.Capability.REASONING,
    )
    assert mimo.fallbacks == ("qwen2.5vl:3b",)
    assert mimo.served == "mimo-vl"
    assert mimo.health.start_timeout_s == 900
    assert mimo.health.stop_grace_s == 30
    assert mimo.health.probe_interval_s == 5.0  # untouched keys keep their defaults

    by_name = {m.name: m for m in cfg.models}
    assert {n: m.priority for n, m in by_name.items()} == {
        "mimo-vl": 100,
        "deepcoder:14b": 50,
        "qwen2.5vl:3b": 40,
        "deepseek-r1:32b": 30,
        "mixtral:8x22b": 10,
    }
    assert {n: m.budget_mib for n, m in by_name.items()} == {
        "mimo-vl": 16384,
        "deepcoder:14b": 9728,  # 9.0 + 0.5 GiB
        "qwen2.5vl:3b": 3584,  # 3.2 + 0.3 GiB
        "deepseek-r1:32b": 5632,  # 5.0 + 0.5 GiB
        "mixtral:8x22b": 2970,  # 1.4 + 1.5 = 2.9 GiB = 2969.6 MiB, rounded up
    }
    assert {n: m.offloaded_mib for n, m in by_name.items()} == {
        "mimo-vl": 0,
        "deepcoder:14b": 0,
        "qwen2.5vl:3b": 0,
        "deepseek-r1:32b": (19 - 5) * 1024,
        "mixtral:8x22b": 79 * 1024 - 1434,  # 1.4 GiB = 1433.6 MiB on the GPU, rounded up
    }
    assert all(m.engine is config.Engine.OLLAMA for m in cfg.models[1:])

    assert cfg.gateway.default_model == "mimo-vl"
    assert (cfg.gateway.host, cfg.gateway.port) == ("127.0.0.1", 8000)
    assert cfg.engines.vllm.command == ("/opt/vllm/bin/vllm",)
    assert (cfg.engines.vllm.ports.first, cfg.engines.vllm.ports.last) == (18100, 18199)
    assert cfg.engines.ollama.command == ("/usr/local/bin/ollama",)
    assert (cfg.engines.ollama.ports.first, cfg.engines.ollama.ports.last) == (18200, 18263)
    assert cfg.gpus.expected_count == 2
    assert [(g.name, g.total_mib) for g in cfg.simulation.gpus] == [
        ("NVIDIA GeForce RTX 4070 Ti SUPER", 16384)
    ] * 2
    assert (cfg.control.socket_mode, cfg.control.socket_group) == ("0660", "fleetd")
    assert (cfg.daemon.log_format, cfg.daemon.on_exit) == ("auto", "stop")
    assert cfg.daemon.state_dir == Path("/var/lib/fleetd")


def test_empty_file_is_a_valid_config_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "fleetd.toml"
    path.write_text("")
    cfg = config.load_config(path)
    assert cfg.models == ()
    assert cfg.gateway.port == 8000
    assert len(cfg.simulation.gpus) == 2


# --- one mistake at a time -----------------------------------------------------------


@dataclass(frozen=True)
class Mistake:
    id: str
    text: str | bytes
    path: str
    fragment: str


MISTAKES = [
    Mistake(
        "misspelt key vram_gb",
        model_toml(extra="vram_gb = 3\n"),
        "models[0](a).vram_gb",
        "did you mean 'vram_gib'?",
    ),
    Mistake(
        "misspelt health key",
        model_toml(extra="[models.health]\nstart_timeout = 30\n"),
        "models[0](a).health.start_timeout",
        "did you mean 'start_timeout_s'?",
    ),
    Mistake(
        "unknown top-level table",
        "[modles]\nname = 'a'\n",
        "modles",
        "unknown key; did you mean 'models'?",
    ),
    Mistake(
        "unknown engine table",
        '[engines.vlm]\ncommand = ["vllm"]\n',
        "engines.vlm",
        "did you mean 'vllm'?",
    ),
    Mistake(
        "top-level key named like a pydantic union tag",
        "int = 1\n",
        "int",
        "unknown key (allowed here: alerts, control, daemon",
    ),
    Mistake(
        "missing engine",
        '[[models]]\nname = "a"\nmodel = "org/a"\nvram_gib = 4\n',
        "models[0](a).engine",
        "required key is missing",
    ),
    Mistake(
        "missing vram_gib",
        '[[models]]\nname = "a"\nengine = "vllm"\nmodel = "org/a"\n',
        "models[0](a).vram_gib",
        "required key is missing",
    ),
    Mistake(
        "missing model",
        '[[models]]\nname = "a"\nengine = "vllm"\nvram_gib = 4\n',
        "models[0](a).model",
        "required key is missing",
    ),
    Mistake(
        "string for a number",
        model_toml().replace("vram_gib = 4", 'vram_gib = "four"'),
        "models[0](a).vram_gib",
        "valid number",
    ),
    Mistake(
        "date for a number",
        model_toml().replace("vram_gib = 4", "vram_gib = 2024-01-01"),
        "models[0](a).vram_gib",
        "valid number",
    ),
    Mistake(
        "negative vram_gib",
        model_toml().replace("vram_gib = 4", "vram_gib = -4"),
        "models[0](a).vram_gib",
        "greater than 0",
    ),
    Mistake(
        "zero vram_gib",
        model_toml().replace("vram_gib = 4", "vram_gib = 0"),
        "models[0](a).vram_gib",
        "greater than 0",
    ),
    Mistake(
        "vram_gib in MiB by mistake",
        model_toml().replace("vram_gib = 4", "vram_gib = 16384"),
        "models[0](a).vram_gib",
        "less than or equal to 1024",
    ),
    Mistake(
        "infinite size_gib",
        model_toml(engine="ollama", extra="size_gib = inf\n"),
        "models[0](a).size_gib",
        "finite number",
    ),
    Mistake(
        "bad engine name",
        model_toml(engine="tgi"),
        "models[0](a).engine",
        "must be one of 'vllm' or 'ollama'",
    ),
    Mistake(
        "bad capability",
        model_toml(extra='capabilities = ["chat", "music"]\n'),
        "models[0](a).capabilities[1]",
        "'chat', 'vision', 'code', 'reasoning' or 'embeddings'",
    ),
    Mistake(
        "replicas negative",
        model_toml(extra="replicas = -1\n"),
        "models[0](a).replicas",
        "greater than or equal to 0",
    ),
    Mistake(
        "replicas float",
        model_toml(extra="replicas = 1.5\n"),
        "models[0](a).replicas",
        "must be a whole number",
    ),
    Mistake(
        "priority out of range",
        model_toml(extra="priority = 5000\n"),
        "models[0](a).priority",
        "less than or equal to 1000",
    ),
    Mistake(
        "upper-case model name",
        model_toml(name="MiMo VL"),
        "models[0](MiMo VL).name",
        "lower-case letters",
    ),
    Mistake(
        "duplicate model names",
        model_toml() + model_toml(engine="ollama"),
        "models[1](a).name",
        "already used by models[0](a)",
    ),
    Mistake(
        "served_name collides with another model",
        model_toml() + model_toml(name="b", extra='served_name = "a"\n'),
        "models[1](b).served_name",
        "already used by models[0](a)",
    ),
    Mistake(
        "alias collides with another model",
        model_toml() + model_toml(name="b", extra='aliases = ["x", "a"]\n'),
        "models[1](b).aliases[1]",
        "already used by models[0](a)",
    ),
    Mistake(
        "fallback to an unknown model",
        model_toml(extra='fallbacks = ["qwen"]\n'),
        "models[0](a).fallbacks[0]",
        "no model is named 'qwen'; known: a",
    ),
    Mistake(
        "fallback to itself",
        model_toml(extra='fallbacks = ["a"]\n'),
        "models[0](a).fallbacks",
        "lists the model itself",
    ),
    Mistake(
        "preferred GPU not in allowed_gpus",
        model_toml(extra="allowed_gpus = [0]\npreferred_gpus = [1]\n"),
        "models[0](a).preferred_gpus[0]",
        "is not in allowed_gpus",
    ),
    Mistake(
        "GPU index >= gpus.expected_count",
        "[gpus]\nexpected_count = 2\n" + model_toml(extra="allowed_gpus = [0, 2]\n"),
        "models[0](a).allowed_gpus[1]",
        "gpus.expected_count is 2, so GPU indices run 0-1",
    ),
    Mistake(
        "GPU ref neither index nor uuid",
        model_toml(extra='preferred_gpus = ["gpu0"]\n'),
        "models[0](a).preferred_gpus",
        "'gpu0' is neither a GPU index nor an NVML UUID ('GPU-...')",
    ),
    Mistake(
        "negative GPU index",
        model_toml(extra="allowed_gpus = [-1]\n"),
        "models[0](a).allowed_gpus",
        "GPU index -1 is negative",
    ),
    Mistake(
        "GPU listed twice",
        model_toml(extra="allowed_gpus = [1, 1]\n"),
        "models[0](a).allowed_gpus",
        "lists a GPU twice",
    ),
    Mistake(
        "vLLM engine_args sets --port",
        model_toml(extra='engine_args = ["--port", "9000"]\n'),
        "models[0](a).engine_args",
        "sets --port, which fleetd sets itself",
    ),
    Mistake(
        "vLLM engine_args sets --gpu-memory-utilization",
        model_toml(extra='engine_args = ["--gpu-memory-utilization=0.9"]\n'),
        "models[0](a).engine_args",
        "sets --gpu-memory-utilization, which fleetd sets itself",
    ),
    Mistake(
        "engine_args on an Ollama model",
        model_toml(engine="ollama", extra='engine_args = ["--verbose"]\n'),
        "models[0](a).engine_args",
        "applies to vLLM models only",
    ),
    Mistake(
        "size_gib on a vLLM model",
        model_toml(extra="size_gib = 19\n"),
        "models[0](a).size_gib",
        "partial offload applies to Ollama models only",
    ),
    Mistake(
        "max_model_len on an Ollama model",
        model_toml(engine="ollama", extra="max_model_len = 8192\n"),
        "models[0](a).max_model_len",
        "applies to vLLM models only",
    ),
    Mistake(
        "probe_timeout_s > probe_interval_s",
        model_toml(extra="[models.health]\nprobe_interval_s = 5\nprobe_timeout_s = 10\n"),
        "models[0](a).health",
        "probe_timeout_s (10.0) must not exceed probe_interval_s (5.0)",
    ),
    Mistake(
        "backoff_initial_s > backoff_max_s",
        model_toml(extra="[models.health]\nbackoff_initial_s = 300\n"),
        "models[0](a).health",
        "backoff_initial_s (300.0) must not exceed backoff_max_s (120.0)",
    ),
    Mistake(
        "port range first > last",
        '[engines.vllm]\ncommand = ["vllm"]\nports = { first = 18199, last = 18100 }\n',
        "engines.vllm.ports",
        "first (18199) is greater than last (18100)",
    ),
    Mistake(
        "privileged engine port",
        '[engines.vllm]\ncommand = ["vllm"]\nports = { first = 80, last = 18100 }\n',
        "engines.vllm.ports.first",
        "greater than or equal to 1024",
    ),
    Mistake(
        "engine port ranges overlap",
        '[engines.vllm]\ncommand = ["vllm"]\nports = { first = 18150, last = 18250 }\n',
        "engines.ollama.ports",
        "overlaps engines.vllm.ports 18150-18250",
    ),
    Mistake(
        "engine command empty",
        "[engines.ollama]\ncommand = []\nports = { first = 18200, last = 18263 }\n",
        "engines.ollama.command",
        "at least 1 item",
    ),
    Mistake(
        "gateway port inside an engine port range",
        "[gateway]\nport = 18210\n",
        "gateway.port",
        "lies inside engines.ollama.ports 18200-18263",
    ),
    Mistake(
        "gateway.default_model unknown",
        model_toml() + "[gateway]\ndefault_model = 'mimo'\n",
        "gateway.default_model",
        "no model is named so; known: a",
    ),
    Mistake(
        "bad socket_mode",
        "[control]\nsocket_mode = 'rw-rw----'\n",
        "control.socket_mode",
        "must be an octal mode such as '0660'",
    ),
    Mistake(
        "socket_mode as a number",
        "[control]\nsocket_mode = 660\n",
        "control.socket_mode",
        "valid string",
    ),
    Mistake(
        "bad log_format",
        "[daemon]\nlog_format = 'text'\n",
        "daemon.log_format",
        "'auto', 'console' or 'json'",
    ),
    Mistake(
        "bad alert hook kind",
        "[[alerts.hooks]]\nkind = 'email'\ntarget = 'ops@example.com'\n",
        "alerts.hooks[0].kind",
        "'exec' or 'webhook'",
    ),
    Mistake(
        "gpus.device names no GPU",
        "[[gpus.device]]\ngpu = 'first'\nreserved_mib = 512\n",
        "gpus.device[0].gpu",
        "neither a GPU index nor an NVML UUID",
    ),
    Mistake(
        "gpus.device index >= expected_count",
        "[gpus]\nexpected_count = 1\n[[gpus.device]]\ngpu = 1\n",
        "gpus.device[0].gpu",
        "GPU indices run 0-0",
    ),
    Mistake(
        "gpus.device listed twice",
        "[[gpus.device]]\ngpu = 0\n[[gpus.device]]\ngpu = 0\n",
        "gpus.device[1].gpu",
        "listed twice",
    ),
    Mistake(
        "simulation without GPUs",
        "[simulation]\ngpus = []\n",
        "simulation.gpus",
        "at least 1 item",
    ),
    Mistake(
        "unknown key in a simulated GPU",
        "[[simulation.gpus]]\ntotal_mib = 16384\nvram_gib = 16\n",
        "simulation.gpus[0].vram_gib",
        "unknown key (allowed here: name, reserved_mib, total_mib)",
    ),
    Mistake(
        "models as a string",
        'models = "mimo-vl"\n',
        "models",
        "valid tuple",
    ),
    Mistake(
        "[models] instead of [[models]]",
        '[models]\nname = "a"\n',
        "models",
        "valid tuple",
    ),
    Mistake(
        "TOML syntax error",
        '[daemon]\nlog_format = "auto"\non_exit stop\n',
        "",
        "not valid TOML: Expected '=' after a key in a key/value pair (at line 3, column 9)",
    ),
    Mistake(
        "top-level TOML array",
        '["mimo-vl", "deepcoder:14b"]\n',
        "",
        "not valid TOML",
    ),
    Mistake(
        "non-UTF-8 file",
        b"[daemon]\nlog_format = '\xe9'\n",
        "",
        "file is not valid UTF-8",
    ),
]


def test_mistake_table_has_distinct_entries() -> None:
    assert len(MISTAKES) >= 20
    assert len({m.id for m in MISTAKES}) == len(MISTAKES)
    assert len({m.text for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_each_mistake_is_reported_once_at_its_key_path(tmp_path: Path, mistake: Mistake) -> None:
    problems = problems_of(tmp_path, mistake.text)
    assert [(p.path, mistake.fragment in p.message) for p in problems] == [(mistake.path, True)], (
        problems
    )


def test_toml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    text = model_toml() + "vram_gib = 4\n"  # the same key twice
    [problem] = problems_of(tmp_path, text)
    assert problem.message.startswith("not valid TOML: ")
    assert "line 6" in problem.message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load_config(path)
    [problem] = info.value.problems
    assert problem.message == "file not found"
    assert str(path) in str(info.value)


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load_config(tmp_path)
    [problem] = info.value.problems
    assert problem.message.startswith("cannot read: ")


def test_rule_about_a_whole_table_does_not_dump_the_table() -> None:
    doc = tomllib.loads(model_toml(extra='fallbacks = ["a"]\n'))
    with pytest.raises(ConfigError) as info:
        config.parse_config(doc)
    assert [str(p) for p in info.value.problems] == [
        "models[0](a).fallbacks = ['a']: lists the model itself"
    ]


def test_union_member_types_do_not_leak_into_paths() -> None:
    doc = tomllib.loads(model_toml(extra="allowed_gpus = [[0]]\n"))
    with pytest.raises(ConfigError) as info:
        config.parse_config(doc)
    assert {p.path for p in info.value.problems} == {"models[0](a).allowed_gpus[0]"}


def test_env_var_named_like_a_union_tag_keeps_its_name() -> None:
    doc = tomllib.loads(
        '[engines.vllm]\ncommand = ["vllm"]\nports = { first = 18100, last = 18199 }\n'
        "env = { int = 5 }\n"
    )
    with pytest.raises(ConfigError) as info:
        config.parse_config(doc)
    assert [p.path for p in info.value.problems] == ["engines.vllm.env.int"]


# --- many mistakes at once -----------------------------------------------------------

MANY_SCHEMA_MISTAKES = """\
[daemon]
log_format = "text"                 # 1: not auto | console | json

[control]
socket_mode = "660rw"               # 2: not octal

[gateway]
port = "8000"                       # (accepted: pydantic reads the string as a number)
host = 127                          # 3: not a string

[[models]]
name = "mimo-vl"
engine = "vllm"
model = "XiaomiMiMo/MiMo-VL-7B-RL"
vram_gb = 14                        # 4: misspelt, and so 5: vram_gib is missing

[[models]]
name = "deepcoder:14b"
engine = "olama"                    # 7: not vllm | ollama
model = "deepcoder:14b"
vram_gib = 9.0
replicas = -2                       # 8: negative

[models.health]
probe_timeout_s = 9                 # 9: longer than the 5 s interval

[[models]]
name = "qwen3"
engine = "vllm"
model = "Qwen/Qwen3-8B"
vram_gib = 12
engine_args = ["--port=9000"]       # 6: reserved flag
"""


def test_schema_mistakes_in_one_file_are_all_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, MANY_SCHEMA_MISTAKES)
    assert [p.path for p in problems] == [
        "daemon.log_format",
        "control.socket_mode",
        "gateway.host",
        "models[0](mimo-vl).vram_gib",
        "models[0](mimo-vl).vram_gb",
        "models[1](deepcoder:14b).engine",
        "models[1](deepcoder:14b).replicas",
        "models[1](deepcoder:14b).health",
        "models[2](qwen3).engine_args",
    ]


MANY_CROSS_MISTAKES = """\
[gateway]
port = 18100                        # 1: inside the vLLM port range
default_model = "mimo"              # 2: no such model

[gpus]
expected_count = 2

[[models]]
name = "mimo-vl"
engine = "vllm"
model = "XiaomiMiMo/MiMo-VL-7B-RL"
vram_gib = 14
allowed_gpus = [0]
preferred_gpus = [1]                # 3: not allowed
fallbacks = ["qwen2.5vl"]           # 4: no such model

[[models]]
name = "mimo-vl"                    # 5: duplicate
engine = "ollama"
model = "qwen2.5vl:3b"
vram_gib = 3.2
allowed_gpus = [3]                  # 6: only 0-1 exist
"""


def test_cross_checked_mistakes_in_one_file_are_all_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, MANY_CROSS_MISTAKES)
    assert sorted(p.path for p in problems) == sorted(
        [
            "gateway.port",
            "gateway.default_model",
            "models[0](mimo-vl).preferred_gpus[0]",
            "models[0](mimo-vl).fallbacks[0]",
            "models[1](mimo-vl).name",
            "models[1](mimo-vl).allowed_gpus[0]",
        ]
    )


def test_render_lists_every_problem_on_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "fleetd.toml"
    path.write_text(MANY_SCHEMA_MISTAKES)
    with pytest.raises(ConfigError) as info:
        config.load_config(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 9 problems in the configuration"
    assert len(lines) == 10
    assert all(line.startswith("  - ") for line in lines[1:])
    assert "  - models[1](deepcoder:14b).replicas = -2: input should be greater than or" in (
        "\n".join(lines)
    )


# --- key paths ----------------------------------------------------------------------


def test_path_names_the_model_in_the_example(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("vram_gib = 9.0 ", "vram_gib = -9.0")
    problems = problems_of(tmp_path, text)
    assert [str(p) for p in problems] == [
        "models[1](deepcoder:14b).vram_gib = -9.0: input should be greater than 0"
    ]


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        ((), ""),
        (("gateway", "port"), "gateway.port"),
        (("models", 1, "vram_gib"), "models[1](deepcoder:14b).vram_gib"),
        (("models", 0, "health", "stop_grace_s"), "models[0](mimo-vl).health.stop_grace_s"),
        (("models", 0, "capabilities", 2), "models[0](mimo-vl).capabilities[2]"),
        (("models", 9, "name"), "models[9].name"),  # past the end: no name to show
        (("gateway", "port", "x"), "gateway.port.x"),  # below a scalar
    ],
)
def test_format_path(loc: tuple[int | str, ...], expected: str) -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    assert config_errors.format_path(loc, doc) == expected


# --- the command line ----------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetd", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_check_config_accepts_the_example() -> None:
    result = check_config(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "OK — 5 model(s) (1 vLLM, 4 Ollama)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_config_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "fleetd.toml"
    path.write_text(MANY_SCHEMA_MISTAKES)
    result = check_config(path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{path}: 9 problems in the configuration" in result.stderr
    for needle in [
        "daemon.log_format = 'text'",
        "control.socket_mode = '660rw'",
        "gateway.host = 127",
        "models[0](mimo-vl).vram_gib: required key is missing",
        "models[0](mimo-vl).vram_gb: unknown key; did you mean 'vram_gib'?",
        "models[2](qwen3).engine_args = ['--port=9000']: sets --port, which fleetd sets itself",
        "models[1](deepcoder:14b).engine = 'olama': must be one of 'vllm' or 'ollama'",
        "models[1](deepcoder:14b).replicas = -2",
        "models[1](deepcoder:14b).health: probe_timeout_s (9.0) must not exceed",
    ]:
        assert needle in result.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "file not found"),
        (b"\xff\xfe[daemon]\n", "not valid UTF-8"),
        ("[1, 2]\n", "not valid TOML"),
        ("models = 'x'\n", "models = 'x'"),
        ("int = 1\n", "int: unknown key"),
    ],
    ids=["missing file", "not UTF-8", "TOML array", "models is a string", "union-tag key"],
)
def test_check_config_never_shows_a_traceback(
    tmp_path: Path, text: str | bytes | None, needle: str
) -> None:
    path = tmp_path / "fleetd.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    result = check_config(path)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# --- no input makes validation crash -------------------------------------------------


def _field_names(model: type[BaseModel], seen: set[str]) -> None:
    for name, field in model.model_fields.items():
        seen.add(name)
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg.__name__ not in seen:
                seen.add(arg.__name__)
                _field_names(arg, seen)


def _keys() -> list[str]:
    seen: set[str] = set()
    _field_names(config.FleetConfig, seen)
    names = sorted(k for k in seen if k[0].islower())
    return [*names, "vllm", "ollama", "int", "str", "float", "bool", "bogus", ""]


TOP_KEYS = sorted(config.FleetConfig.model_fields)

scalars = st.one_of(
    st.sampled_from(
        ["a", "b", "vllm", "ollama", "chat", "vision", "GPU-1234", "0660", "--port", "auto", ""]
    ),
    st.text(max_size=8),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, 2, 8000, 18100, 18200, 65536]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.dates(),
    st.datetimes(timezones=st.just(dt.UTC) | st.none()),
    st.times(),
)
trees = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_keys()), inner, max_size=5)
    ),
    max_leaves=25,
)
names = st.sampled_from(["a", "b", "c", "Bad Name"])
gpu_ref = st.sampled_from([0, 1, 2, -1, "GPU-1", "MIG-2", "gpu3"])
gpu_refs = st.lists(gpu_ref, max_size=3)
# Mostly valid models, so that documents also get through the schema to the cross-checks.
near_valid_models = st.fixed_dictionaries(
    {
        "name": names,
        "engine": st.sampled_from(["vllm", "ollama"]),
        "model": st.just("org/model"),
        "vram_gib": st.sampled_from([0.5, 4, 14.0, 0, math.inf]),
    },
    optional={
        "served_name": names,
        "aliases": st.lists(names, max_size=2),
        "fallbacks": st.lists(names, max_size=2),
        "allowed_gpus": gpu_refs,
        "preferred_gpus": gpu_refs,
        "size_gib": st.sampled_from([1.0, 19, 1e300]),
        "max_model_len": st.sampled_from([4096, 0]),
        "engine_args": st.lists(st.sampled_from(["--port", "--quantization=awq"]), max_size=2),
        "health": st.dictionaries(st.sampled_from(_keys()), scalars, max_size=3),
        "bogus": scalars,
    },
)
near_valid_documents = st.fixed_dictionaries(
    {"models": st.lists(near_valid_models, max_size=4)},
    optional={
        "gpus": st.fixed_dictionaries(
            {"expected_count": st.integers(0, 3)},
            optional={"device": st.lists(st.fixed_dictionaries({"gpu": gpu_ref}), max_size=2)},
        ),
        "gateway": st.dictionaries(
            st.sampled_from(["port", "default_model"]), st.sampled_from([8000, 18100, "a", "z"])
        ),
    },
)
documents = st.one_of(
    st.dictionaries(st.sampled_from(TOP_KEYS), trees, max_size=5),
    st.fixed_dictionaries(
        {"models": st.lists(st.dictionaries(st.sampled_from(_keys()), trees), max_size=3)}
    ),
    near_valid_documents,
    trees,
)


def parse_or_error(doc: object) -> config.FleetConfig | ConfigError:
    try:
        return config.parse_config(cast("dict[str, Any]", doc))
    except ConfigError as exc:
        return exc


@settings(max_examples=200, deadline=None)
@given(doc=documents)
def test_parse_config_only_ever_raises_config_error(doc: object) -> None:
    result = parse_or_error(doc)  # any other exception fails the test
    if isinstance(result, ConfigError):
        assert result.problems
        assert all(p.message for p in result.problems)
        count = len(result.problems)
        assert str(result).startswith(f"<config>: {count} problem")
    else:
        for model in result.models:  # derived numbers are computable for whatever was accepted
            assert model.budget_mib > 0
            assert model.offloaded_mib >= 0


def test_fuzzer_key_pool_covers_every_table() -> None:
    """The fuzzer can write any key of any table, so it reaches the nested validators."""
    for table in (config.ModelSpec, config.HealthSpec, config.PortRange, config.GpuOverride):
        assert set(table.model_fields) <= set(_keys())
