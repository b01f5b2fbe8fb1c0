"""Config: composition, precedence, casting, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from lowrank_train.cli import main
from lowrank_train.config import RunConfig, dump_yaml, to_dict
from lowrank_train.errors import ConfigError
from lowrank_train.models import PRESETS, build_model
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.base import LowRankOptions, Projector
from lowrank_train.resolve import load_run

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    return write(tmp_path / "run.yaml", {"train": {"steps": 10}})


def error_of(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_run(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults_and_name(run_file):
    cfg, _ = load_run(run_file)
    assert cfg.name == "run" and cfg.train.steps == 10 and cfg.model.preset == "llama_20m"
    assert cfg.run_dir == Path("runs/run")


def test_precedence_defaults_include_file_cli(tmp_path):
    write(tmp_path / "a.yaml", {"train": {"lr": 0.1, "batch_size": 4}, "model": {"seq_len": 64}})
    write(tmp_path / "b.yaml", {"train": {"lr": 0.2}})
    run = write(
        tmp_path / "run.yaml",
        {"include": ["a.yaml", "b.yaml"], "train": {"steps": 5, "batch_size": 6}},
    )
    cfg, sources = load_run(run, ["model.seq_len=32"])
    assert cfg.train.lr == 0.2  # later include wins over earlier
    assert cfg.train.batch_size == 6  # run file wins over includes
    assert cfg.model.seq_len == 32  # CLI wins over everything
    assert cfg.train.grad_accum == 1  # default
    assert sources["train.lr"].endswith("b.yaml") and sources["model.seq_len"] == "command line"


def test_overrides_cast_to_field_type(run_file):
    cfg, _ = load_run(
        run_file,
        [
            "train.lr=3e-4",
            "train.tokens=0",
            "optim.betas=[0.9,0.95]",
            "model.gradient_checkpointing=true",
            "weights.target=q_proj,v_proj",
            "train.seed=1_000",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.weights.target == ["q_proj", "v_proj"]
    assert cfg.train.seed == 1000


def test_tokens_as_float_literal(tmp_path):
    cfg, _ = load_run(write(tmp_path / "r.yaml", "train:\n  tokens: 1e6\n"))
    assert cfg.train.tokens == 1_000_000 and cfg.train.steps == 0


@pytest.mark.parametrize(
    "data, overrides, expected",
    [
        ({"train": {"steps": 10, "lrr": 1}}, [], "train.lrr: unknown key (did you mean lr?)"),
        (
            {"train": {"steps": 10}, "optim": {"projector": {"rnak": 4}}},
            [],
            "optim.projector.rnak: unknown key of none (did you mean rank?)",
        ),
        ({"train": {"steps": 10}}, ["train.lr=abc"], "train.lr: 'abc' is not float"),
        ({"train": {"steps": 10}}, ["train.steps=1.5"], "train.steps: 1.5 is not int"),
        (
            {"train": {"steps": 10}},
            ["model.preset=llama_21m"],
            "model.preset: 'llama_21m' is not one of",
        ),
        (
            {"train": {"steps": 10}},
            ["weights.name=sltrian"],
            "weights.name: unknown parameterization 'sltrian'",
        ),
        (
            {"train": {"steps": 10}},
            ["optim.name=adam8bit"],
            "optim.name: unknown optimizer 'adam8bit'",
        ),
        ({"train": {"steps": 10, "tokens": 100}}, [], "are both set; set exactly one"),
        ({"train": {}}, [], "set exactly one of train.steps and train.tokens"),
        (
            {"train": {"steps": 10, "warmup_ratio": 1.0}},
            [],
            "train.warmup_ratio: 1.0 is outside [0, 1)",
        ),
        (
            {"train": {"steps": 10, "batch_size": 0}},
            [],
            "train.batch_size: 0 is below the minimum 1",
        ),
        (
            {"train": {"steps": 10}},
            ["train.compile=yes please"],
            "train.compile: 'yes please' is not a bool",
        ),
        ({"train": {"steps": 10}}, ["trainlr"], "an override is key=value"),
        ({"train": {"steps": 10}}, ["train=3"], "train: is a section; give keys under it, not 3"),
        (
            {"train": {"steps": 10}},
            ["weights.target=q_prj"],
            "weights.target: 'q_prj' is not one of",
        ),
        (
            {"train": {"steps": 10}},
            ["optim.projector.rank=64"],
            "optim.projector.rank: 64 does not apply to projector none (it has no keys)",
        ),
        (
            {"train": {"steps": 10}, "optim": {"projector": {"svd": "exact"}}},
            [],
            "optim.projector.svd: 'exact' does not apply to projector none",
        ),
        (
            {"train": {"steps": 10}},
            ["optim.projector.name=galroe"],
            "optim.projector.name: unknown projector 'galroe'; registered: ",
        ),
        (
            {"train": {"steps": 10}, "weights": {"rnak": 4}},
            [],
            "weights.rnak: unknown key of dense (did you mean rank?)",
        ),
        (
            {"train": {"steps": 10}},
            ["optim.state_dtype=int8"],
            "optim.state_dtype: int8 has no effect",
        ),
        (
            {"train": {"steps": 10}},
            ["optim.per_layer=true"],
            "train.clip_grad_norm: 1.0 with optim.per_layer=true: each tensor steps inside "
            "backward, before the global norm is known; set train.clip_grad_norm=0",
        ),
        (
            {"train": {"steps": 10}},
            ["data.vocab_size=512", "data.tokenizer=gpt2"],
            "data.vocab_size: 512 applies only to data.tokenizer=bpe",
        ),
    ],
)
def test_errors_are_one_line_naming_file_key_value(tmp_path, data, overrides, expected):
    path = write(tmp_path / "bad.yaml", data)
    message = error_of(path, overrides)
    assert expected in message, message
    source = "command line" if overrides and "command line" in message else str(path)
    assert message.startswith(source), message


def test_error_names_the_included_file_that_set_the_key(tmp_path):
    inc = write(tmp_path / "frag.yaml", {"optim": {"weight_decay": -1}})
    run = write(tmp_path / "run.yaml", {"include": ["frag.yaml"], "train": {"steps": 3}})
    assert error_of(run).startswith(f"{inc}: optim.weight_decay: -1.0 must be >= 0")


def test_missing_file_bad_yaml_and_include_cycle(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml")
    assert "not valid YAML" in error_of(write(tmp_path / "broken.yaml", "train: [1,\n"))
    write(tmp_path / "x.yaml", {"include": ["y.yaml"]})
    y = write(tmp_path / "y.yaml", {"include": ["x.yaml"]})
    assert "includes itself" in error_of(y)


@pytest.mark.parametrize(
    "argv, key",
    [
        (["train.lrr=1"], "train.lrr: unknown key"),
        (["train.tokens=5"], "both set"),
        (["model.preset=llama_3b"], "model.preset"),
    ],
)
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, run_file, argv, key):
    code = main(["train", str(run_file), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, err


def test_resolved_config_round_trips(run_file, tmp_path):
    cfg, _ = load_run(run_file, ["train.lr=5e-4", "optim.betas=[0.9,0.95]"])
    again, _ = load_run(write(tmp_path / "resolved.yaml", dump_yaml(cfg)))
    assert again == cfg
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("projector", PROJECTORS.names())
def test_every_registered_projector_round_trips_with_its_own_defaults(
    run_file, tmp_path, projector
):
    cfg, _ = load_run(run_file, [f"optim.projector.name={projector}"])
    method = cfg.optim.projector.method
    assert method == PROJECTORS.get(projector).Config()  # unset keys: the method's defaults
    dumped = yaml.safe_load(dump_yaml(cfg))["optim"]["projector"]
    assert dumped == {"name": projector, **to_dict(method)}
    again, _ = load_run(write(tmp_path / "resolved.yaml", dump_yaml(cfg)))
    assert again == cfg


def test_every_shipped_config_loads(tmp_path):
    runs = sorted((ROOT / "configs" / "runs").glob("*.yaml"))
    assert runs, "configs/runs is empty"
    for path in runs:
        cfg, _ = load_run(path)
        model = build_model(cfg, 32000, torch.device("meta"))  # structural: no values drawn
        preset = PRESETS[cfg.model.preset]
        assert model.config.num_hidden_layers == (cfg.model.num_layers or preset.layers), path
        assert all(p.device.type == "meta" for p in model.parameters()), path
    for fragment in sorted((ROOT / "configs").glob("*/*.yaml")):
        if fragment.parent.name in ("methods", "models"):
            # the probe lives in tmp_path: the suite must pass on a read-only checkout
            run = tmp_path / f"{fragment.stem}_probe.yaml"
            run.write_text(
                yaml.safe_dump({"include": [str(fragment.resolve())], "train": {"steps": 10}})
            )
            load_run(run)


def test_yaml_off_reads_as_the_string_off(tmp_path):
    cfg, _ = load_run(write(tmp_path / "r.yaml", "train: {steps: 1}\nmodel:\n  autocast: off\n"))
    assert cfg.model.autocast == "off"
    cfg, _ = load_run(tmp_path / "r.yaml", ["model.autocast=bfloat16"])
    assert cfg.model.autocast == "bfloat16"


def test_readme_reference_is_the_generated_one():
    """Every key of the config and of each registered method's Config, with its default and
    help, is in README.md exactly as scripts/config_reference.py writes it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_reference
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from lowrank_train.config import field_docs
    from lowrank_train.resolve import method_field_docs

    generated = config_reference.reference()
    keys = [k for k, _, _ in field_docs()] + [k for _, _, k, _, _ in method_field_docs() if k]
    assert all(f"`{key}`" in generated for key in keys)
    assert {m for _, m, _, _, _ in method_field_docs()} >= set(PROJECTORS.names())
    in_readme = config_reference.readme_block((ROOT / "README.md").read_text())
    missing = [line for line in generated.splitlines() if line not in in_readme.splitlines()]
    outdated = [line for line in in_readme.splitlines() if line not in generated.splitlines()]
    assert in_readme == generated, (
        f"README's configuration reference is stale (missing {missing[:3]}, outdated "
        f"{outdated[:3]}): run python scripts/config_reference.py --write"
    )


# ---------------------------------------------------------------------------------------------
# The resolve step, with a projector registered only for these tests.


class Mini(Projector):
    """A rank-1 random projection (no `svd` key), refusing any other rank in `validate`."""

    name = "mini_test"

    @dataclass
    class Config(LowRankOptions):
        rank: int = 1
        scale: float = 11.3137
        seed_offset: int = 0

    def validate(self, cfg):
        super().validate(cfg)  # the shared keys' bounds
        if self.options.rank != 1:
            raise ConfigError(f"optim.projector.rank: {self.options.rank} must be 1 for mini_test")


@pytest.fixture
def mini(monkeypatch):
    monkeypatch.setitem(PROJECTORS._entries, Mini.name, Mini)
    return Mini


def test_load_config_only_parses_and_imports_no_method_package(tmp_path):
    run = write(
        tmp_path / "run.yaml",
        {"train": {"steps": 3}, "optim": {"projector": {"name": "x", "rank": 4}}},
    )
    code = (
        "import sys; from lowrank_train.config import load_config; "
        f"cfg, _ = load_config({str(run)!r}); "
        "assert cfg.optim.projector.options == {'rank': 4} and cfg.optim.projector.method is None; "
        "bad = [m for m in sys.modules if m.startswith(('lowrank_train.parameterizations', "
        "'lowrank_train.projectors', 'lowrank_train.optim', 'lowrank_train.models'))]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_method_defaults_come_from_the_method_and_validate_sees_the_users_options(tmp_path, mini):
    run = write(
        tmp_path / "run.yaml",
        {"train": {"steps": 3}, "optim": {"projector": {"name": "mini_test"}}},
    )
    cfg, _ = load_run(run)
    assert cfg.optim.projector.method == Mini.Config()  # rank 1, scale 11.3137: its own defaults
    assert cfg.optim.projector.method.update_gap == LowRankOptions().update_gap
    cfg, _ = load_run(run, ["optim.projector.seed_offset=3"])
    assert cfg.optim.projector.method.seed_offset == 3
    # validate runs on the method built with the user's options, and the file is named
    assert error_of(run, ["optim.projector.rank=2"]) == (
        "command line: optim.projector.rank: 2 must be 1 for mini_test"
    )
    frag = write(tmp_path / "frag.yaml", {"optim": {"projector": {"rank": 4}}})
    inc = write(tmp_path / "inc.yaml", {"include": ["frag.yaml", "run.yaml"]})
    assert error_of(inc) == f"{frag}: optim.projector.rank: 4 must be 1 for mini_test"


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "optim.projector.svd=exact",
            "optim.projector.svd: 'exact' does not apply to projector mini_test (its keys: rank, "
            "update_gap, scale, moments_at_refresh, seed_offset)",
        ),
        ("optim.projector.sead_offset=1", "unknown key of mini_test (did you mean seed_offset?)"),
        ("optim.projector.scale=big", "optim.projector.scale: 'big' is not float"),
        ("optim.projector.scale=0", "optim.projector.scale: 0.0 must be > 0"),
        ("optim.projector.update_gap=0", "optim.projector.update_gap: 0 must be >= 1"),
        (
            "optim.projector.moments_at_refresh=rotat",
            "is not one of keep, reset, rotate (did you mean rotate?)",
        ),
    ],
)
def test_method_key_errors_are_one_line_naming_the_key(tmp_path, mini, override, expected):
    run = write(
        tmp_path / "run.yaml",
        {"train": {"steps": 3}, "optim": {"projector": {"name": "mini_test"}}},
    )
    message = error_of(run, [override])
    assert expected in message and message.startswith("command line: "), message


def test_resolved_method_round_trips_with_its_keys_flattened(tmp_path, mini):
    run = write(
        tmp_path / "run.yaml",
        {"train": {"steps": 3}, "optim": {"projector": {"name": "mini_test"}}},
    )
    cfg, _ = load_run(run, ["optim.projector.update_gap=7"])
    dumped = yaml.safe_load(dump_yaml(cfg))
    assert dumped["optim"]["projector"] == {
        "name": "mini_test",
        "rank": 1,
        "update_gap": 7,
        "scale": 11.3137,
        "moments_at_refresh": "keep",
        "seed_offset": 0,
    }
    again, _ = load_run(write(tmp_path / "resolved.yaml", dump_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "argv, key",
    [
        (["optim.projector.name=galroe"], "unknown projector 'galroe'"),
        (["optim.projector.name=mini_test", "optim.projector.rnk=2"], "unknown key of mini_test"),
        (
            ["optim.projector.name=mini_test", "optim.projector.svd=fast"],
            "does not apply to projector mini_test",
        ),
        (["optim.projector.name=mini_test", "optim.projector.rank=3"], "3 must be 1 for mini_test"),
    ],
)
def test_cli_refuses_bad_method_input_in_one_line(run_file, capsys, mini, argv, key):
    code = main(["train", str(run_file), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, err
