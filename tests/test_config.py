"""Training configuration: presets, `--set` overrides, JSON round trips and config files."""

import dataclasses
import json

import pytest

from sfumato.cli import main
from sfumato.config import (PRESETS, RANGES, TrainCfg, apply_overrides, from_dict, get_preset, load_config, to_dict,
                            validate)
from sfumato.errors import UsageError


def test_presets_exist_and_differ():
    assert {"tiny", "small", "base"} <= set(PRESETS)
    tiny, small, base = (get_preset(n) for n in ("tiny", "small", "base"))
    assert (tiny.preset, small.preset, base.preset) == ("tiny", "small", "base")
    assert tiny.data.res == 32 and tiny.data.shapes_n == 600
    assert tiny.vae.channels == (16, 32) and isinstance(tiny.vae.channels, tuple)
    assert tiny.unet.attention_levels == (False, True)
    assert len(tiny.unet.attention_levels) == len(tiny.unet.channels)
    assert base.mixed_precision == "bf16" and base.unet.steps > small.unet.steps > tiny.unet.steps
    # a preset is a fresh object: changing one does not leak into the next
    tiny.clip.steps = 1
    assert get_preset("tiny").clip.steps == 60


def test_unknown_preset_is_usage_error():
    with pytest.raises(UsageError, match="huge"):
        get_preset("huge")


def test_apply_overrides_sets_nested_values_and_coerces():
    cfg = get_preset("tiny")
    out = apply_overrides(cfg, ["unet.lr=1", "vae.channels=[8, 16]", "clip.steps=7", "mixed_precision=bf16",
                                "unet.attention_levels=[True, False]", "seed=3", "data.resize='pad'"])
    assert out is cfg
    assert cfg.unet.lr == 1.0 and type(cfg.unet.lr) is float  # int -> float
    assert cfg.vae.channels == (8, 16) and type(cfg.vae.channels) is tuple  # list -> tuple
    assert cfg.unet.attention_levels == (True, False) and type(cfg.unet.attention_levels) is tuple
    assert cfg.clip.steps == 7 and type(cfg.clip.steps) is int
    assert cfg.mixed_precision == "bf16"  # a bare word is a string
    assert cfg.seed == 3 and cfg.data.resize == "pad"
    assert cfg.clip.lr == get_preset("tiny").clip.lr  # untouched keys keep the preset's value


@pytest.mark.parametrize("assignment, key", [
    ("clip.nope=1", "clip.nope"),
    ("nosection.steps=1", "nosection.steps"),
    ("clip=3", "clip"),  # a section, not a value
    ("bogus=1", "bogus"),
    ("clip.steps.deeper=1", "clip.steps.deeper"),
])
def test_apply_overrides_rejects_unknown_key(assignment, key):
    cfg = get_preset("tiny")
    with pytest.raises(UsageError) as info:
        apply_overrides(cfg, [assignment])
    assert repr(key) in str(info.value) or key in str(info.value)
    assert "unknown config key" in str(info.value)


@pytest.mark.parametrize("assignment, key", [
    ("clip.steps=1.5", "clip.steps"),  # float for int
    ("clip.steps=True", "clip.steps"),  # bool is not an int here
    ("clip.steps=many", "clip.steps"),  # string for int
    ("clip.hard_negatives=1", "clip.hard_negatives"),  # int for bool
    ("unet.lr=fast", "unet.lr"),
    ("vae.channels=16", "vae.channels"),  # scalar for tuple
    ("vae.channels=[16, 'a']", "vae.channels"),  # wrong item type
    ("unet.attention_levels=[1, 0]", "unet.attention_levels"),
])
def test_apply_overrides_rejects_wrong_type(assignment, key):
    cfg = get_preset("tiny")
    before = to_dict(cfg)
    with pytest.raises(UsageError) as info:
        apply_overrides(cfg, [assignment])
    assert key in str(info.value)
    assert to_dict(cfg) == before  # nothing half-applied


def test_apply_overrides_needs_key_value():
    with pytest.raises(UsageError, match="key=value"):
        apply_overrides(get_preset("tiny"), ["clip.steps"])


def test_cli_set_unknown_key_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["train", "--data", "shapesworld", "--out", str(out), "--preset", "tiny", "--set", "clip.nope=3"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "clip.nope" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither model/ nor model.partial/


def test_cli_set_unknown_key_error_is_one_line(tmp_path, capsys):
    code = main(["train", "--data", "shapesworld", "--out", str(tmp_path / "m"), "--preset", "tiny",
                 "--set", "clip.nope=3"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err


def test_cli_set_wrong_type_exits_2(tmp_path, capsys):
    code = main(["train", "--data", "shapesworld", "--out", str(tmp_path / "m"), "--preset", "tiny",
                 "--set", "clip.steps=lots"])
    assert code == 2
    assert "clip.steps" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_to_dict_from_dict_round_trip(preset):
    cfg = apply_overrides(get_preset(preset), ["unet.lr=2e-4", "vae.channels=[8, 8, 16]", "seed=11"])
    d = to_dict(cfg)
    assert d["unet"]["lr"] == 2e-4 and d["preset"] == preset
    assert from_dict(d) == cfg
    # through JSON (tuples become lists, as in run.json) and back
    again = from_dict(json.loads(json.dumps(d)))
    assert again == cfg
    assert type(again.vae.channels) is tuple and type(again.sample_prompts) is tuple
    assert dataclasses.asdict(again) == d


def test_from_dict_refuses_unknown_key_by_name():
    d = to_dict(get_preset("tiny"))
    d["clip"]["wingspan"] = 3
    with pytest.raises(UsageError, match="clip.wingspan"):
        from_dict(d)


def test_load_config_reads_sections(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"preset": "tiny", "seed": 5, "unet": {"lr": 1, "steps": 12},
                                "data": {"res": 16}, "vae": {"channels": [8, 16]}}))
    cfg = load_config(path)
    assert isinstance(cfg, TrainCfg)
    assert cfg.preset == "tiny" and cfg.seed == 5
    assert cfg.unet.lr == 1.0 and type(cfg.unet.lr) is float and cfg.unet.steps == 12
    assert cfg.data.res == 16 and cfg.vae.channels == (8, 16)
    tiny = get_preset("tiny")
    assert cfg.clip == tiny.clip and cfg.data.shapes_n == tiny.data.shapes_n  # the rest from the preset


def test_load_config_defaults_to_small_preset(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"clip": {"steps": 9}}))
    cfg = load_config(path)
    assert cfg.preset == "small" and cfg.clip.steps == 9
    assert cfg.unet.steps == get_preset("small").unet.steps


@pytest.mark.parametrize("text, match", [
    ('{"clip": {"nope": 1}}', "clip.nope"),
    ('{"clip": {"steps": "x"}}', "clip.steps"),
    ("[1, 2]", "JSON object"),
    ("{not json", "cannot read config"),
])
def test_load_config_errors(tmp_path, text, match):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_config(path)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read config"):
        load_config(tmp_path / "absent.json")


def test_cli_config_file_and_set_unknown_stage(tmp_path, capsys):
    """--config is read and --stages is checked before anything is written."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"preset": "tiny"}))
    out = tmp_path / "m"
    assert main(["train", "--data", "shapesworld", "--out", str(out), "--config", str(path),
                 "--stages", "tokenizer,paint"]) == 2
    assert "paint" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m.partial").exists()


def _numeric_keys(obj, prefix=""):
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_keys(value, f"{prefix}{f.name}.")
        elif hints[f.name] in (int, float) or hints[f.name] == tuple[int, ...]:
            yield prefix + f.name


def test_every_numeric_key_has_a_range_and_presets_are_in_it():
    assert set(_numeric_keys(TrainCfg())) == set(RANGES)
    for name in PRESETS:
        validate(get_preset(name))


@pytest.mark.parametrize("assignment, key", [
    ("clip.steps=-5", "clip.steps"), ("unet.steps=0", "unet.steps"), ("vae.lr=-1e-3", "vae.lr"),
    ("data.holdout=1.5", "data.holdout"), ("unet.caption_dropout=2.0", "unet.caption_dropout"),
    ("vae.channels=[16, 0]", "vae.channels"), ("unet.lr=float('nan')", "unet.lr"), ("log_every=0", "log_every"),
])
def test_validate_refuses_out_of_range_values(assignment, key):
    cfg = get_preset("tiny")
    cfg = apply_overrides(cfg, [assignment.replace("float('nan')", "1e999")]) if "nan" in assignment \
        else apply_overrides(cfg, [assignment])
    with pytest.raises(UsageError, match=key.replace(".", r"\.") + " must be between"):
        validate(cfg)


def test_cli_negative_steps_exit_2_and_writes_nothing(tmp_path, capsys):
    code = main(["train", "--data", "shapesworld", "--out", str(tmp_path / "m"), "--preset", "tiny",
                 "--set", "clip.steps=-5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "clip.steps must be between 1" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
