"""Config: defaults, YAML round trip, overrides, and one clear line per mistake."""
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from raypar.config import (ConfigError, RunSpec, choose_dp, from_dict, load_spec,
                           model_config, parse_override, validate)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
REQUIRED = ["model.n_layer", "model.n_head", "model.d_model", "data.path", "data.seq_len",
            "data.tokenizer", "train.steps", "train.global_batch", "train.micro_batch",
            "train.lr", "train.seed", "train.dtype", "parallel.dp", "parallel.tp",
            "parallel.pp", "checkpoint.every", "tracking.uri"]


def test_required_field_names_exist():
    flat = RunSpec().flat()
    assert [k for k in REQUIRED if k not in flat] == []


def test_defaults_are_valid_and_equal_laptop_yaml():
    spec = validate(RunSpec())
    assert load_spec(ROOT / "jobs" / "configs" / "laptop.yaml") == spec


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    spec = load_spec(path)
    out = tmp_path / "c.yaml"
    out.write_text(spec.to_yaml())
    assert load_spec(out) == spec
    assert from_dict(yaml.safe_load(spec.to_yaml())) == spec


def test_overrides_beat_file_beat_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {steps: 7, lr: 0.01}\n")
    spec = load_spec(f, ["train.lr=3e-4", "model.bias=true", "data.path=/tmp/x"])
    assert spec.train.steps == 7            # file over default
    assert spec.train.lr == pytest.approx(3e-4)   # CLI over file
    assert spec.model.bias is True and spec.data.path == "/tmp/x"
    assert spec.train.global_batch == RunSpec().train.global_batch  # default kept


def test_parse_override_reads_yaml_values():
    assert parse_override("train.steps=5") == ("train.steps", 5)
    assert parse_override("data.path=") == ("data.path", "")
    assert parse_override("model.pos_encoding=learned") == ("model.pos_encoding", "learned")


@pytest.mark.parametrize("override, field", [
    ("train.stepz=5", "train.stepz"),
    ("trian.steps=5", "trian.steps"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=yes", "train.lr"),
    ("data.seq_len=0", "data.seq_len"),
    ("data.seq_len=-3", "data.seq_len"),
    ("train.dtype=fp16", "train.dtype"),
    ("model.pos_encoding=alibi", "model.pos_encoding"),
    ("model.n_head=3", "model.d_model"),
    ("model.dropout=1.5", "model.dropout"),
    ("train.global_batch=10", "train.global_batch"),
    ("parallel.dp=0", "parallel.dp"),
    ("parallel.tp=3", "model.n_head"),
    ("parallel.virtual_stages=2", "parallel.virtual_stages"),
    ("data.tokenizer=wordpiece", "data.tokenizer"),
    ("train.min_lr=1.0", "train.min_lr"),
    ("model.bias=maybe", "model.bias"),
    ("noequals", "--set 'noequals'"),
    ("parallel.elastic.min_replicas=0", "parallel.elastic.min_replicas"),
    ("parallel.elastic.max_replicas=-1", "parallel.elastic.max_replicas"),
    ("parallel.elastic.replicas=2", "parallel.elastic.replicas"),
    ("parallel.elastic=4", "parallel.elastic"),
    ("parallel.dp.x=1", "parallel.dp.x"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_spec(None, [override])
    msg = str(e.value)
    assert msg.startswith(field) and "\n" not in msg


def test_global_batch_must_split_over_dp_and_micro_batch():
    with pytest.raises(ConfigError, match=r"train.global_batch: 12 must be divisible by "
                                          r"parallel.dp \* train.micro_batch = 2 \* 4 = 8"):
        load_spec(None, ["train.global_batch=12", "parallel.dp=2", "train.micro_batch=4"])
    assert load_spec(None, ["train.global_batch=24", "train.micro_batch=4"]).grad_accum == 3


@pytest.mark.parametrize("schedule, extra, m, ok", [
    ("1f1b", [], 1, False), ("1f1b", [], 2, True), ("gpipe", [], 1, True),
    ("interleaved_1f1b", ["parallel.virtual_stages=2"], 5, False),
    ("interleaved_1f1b", ["parallel.virtual_stages=2"], 3, True),
    ("interleaved_1f1b", ["parallel.virtual_stages=2"], 6, True),
    ("dualpipev", ["parallel.virtual_stages=2"], 3, False),
    ("dualpipev", ["parallel.virtual_stages=2"], 4, True),
])
def test_pipeline_schedules_micro_batch_counts(schedule, extra, m, ok):
    """The counts torch's schedules refuse on the workers are refused before Ray starts,
    with one line that names the field and shows the count."""
    over = ["parallel.pp=2", "parallel.dp=1", "parallel.dp_mode=fsdp",
            f"parallel.schedule={schedule}", *extra, "train.micro_batch=2",
            f"train.global_batch={2 * m}"]
    if ok:
        assert load_spec(None, over).grad_accum == m
        return
    with pytest.raises(ConfigError) as e:
        load_spec(None, over)
    assert str(e.value).startswith(f"train.micro_batch: schedule {schedule}")
    assert f"= {2 * m} / (1 * 2) = {m}" in str(e.value) and "\n" not in str(e.value)


def test_elastic_range_as_yaml_mapping_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("parallel: {pp: 1, elastic: {min_replicas: 1, max_replicas: 4}}\n"
                 "train: {global_batch: 24, micro_batch: 2}\n")
    spec = load_spec(f, ["parallel.elastic.resize_interval_s=5"])
    e = spec.parallel.elastic
    assert (e.min_replicas, e.max_replicas, e.resize_interval_s) == (1, 4, 5.0)
    assert spec.flat()["parallel.elastic.max_replicas"] == 4  # MLflow params: flat keys
    assert (spec.min_dp, spec.max_dp, spec.world_size) == (1, 4, 4)
    assert from_dict(yaml.safe_load(spec.to_yaml())) == spec
    fixed = spec.with_dp(3)
    assert fixed.parallel.dp == 3 and not fixed.parallel.elastic.enabled
    assert spec.parallel.elastic.enabled  # with_dp copies


@pytest.mark.parametrize("overrides, error", [
    (["parallel.elastic={min_replicas: 3, max_replicas: 2}"],
     "parallel.elastic.max_replicas: must be >= parallel.elastic.min_replicas=3, got 2"),
    (["parallel.elastic={min_replicas: 0, max_replicas: 2}"],
     "parallel.elastic.min_replicas: must be >= 1"),
    (["parallel.elastic.min_replicas=3"],  # no max_replicas: still fixed at parallel.dp=2
     "parallel.elastic.max_replicas: must be >= parallel.elastic.min_replicas=3, got 0"),
    # The smallest group must be a valid layout: 16 sequences do not split over 3 replicas.
    (["parallel.elastic={min_replicas: 3, max_replicas: 4}"],
     "parallel.elastic.min_replicas=3: train.global_batch: 16 must be divisible"),
])
def test_elastic_range_mistakes(overrides, error):
    with pytest.raises(ConfigError) as e:
        load_spec(None, overrides)
    assert str(e.value).startswith(error)


def test_choose_dp_takes_the_most_whole_replicas_that_split_the_batch():
    # pp=2: a replica is 2 workers; global_batch 16 / micro_batch 2 splits over 1, 2, 4, 8.
    spec = load_spec(None, ["parallel.elastic={min_replicas: 1, max_replicas: 4}"])
    assert [choose_dp(spec, n) for n in range(10)] == [0, 0, 1, 1, 2, 2, 2, 2, 4, 4]
    # 24 / 2 splits over 1, 2, 3, 4 (not 5): the sixth replica's workers sit out.
    spec = load_spec(None, ["parallel.pp=1", "train.global_batch=24",
                            "parallel.elastic={min_replicas: 2, max_replicas: 6}"])
    assert [choose_dp(spec, n) for n in range(1, 8)] == [0, 2, 3, 4, 4, 6, 6]
    # Not elastic: dp is what the config says, given enough workers.
    assert choose_dp(load_spec(None, []), 4) == 2


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("optimizer: {lr: 1}\n")
    with pytest.raises(ConfigError, match="^optimizer: unknown section"):
        load_spec(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="^config: expected a mapping"):
        load_spec(bad)


KEYS = sorted(RunSpec().flat()) + ["train.nope", "nope.steps", "name", "x"]
VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(),
                   st.text(max_size=12), st.none(), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=6))
def test_random_overrides_never_raise_anything_but_config_error(pairs):
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in pairs]
    try:
        spec = load_spec(None, overrides)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert isinstance(spec, RunSpec) and spec.world_size >= 1


@pytest.mark.parametrize("overrides, error", [
    (["parallel.dp=1000000000", "train.global_batch=2000000000"],
     "parallel: dp*pp*tp = 1000000000*2*1 = 2000000000 workers; at most 1,000,000 are allowed"),
    (["parallel.elastic={min_replicas: 1, max_replicas: 600000}"],
     "parallel.elastic.max_replicas: max_replicas*pp*tp = 600000*2*1 = 1200000 workers"),
    (["model.n_layer=100001"], "model.n_layer: must be <= 100,000, got 100001"),
    (["model.d_model=40000000", "model.n_head=1"], "model: n_layer=4, d_model=40000000"),
    (["model.d_model=10000000", "model.n_head=1", "model.n_layer=1"],
     "model: n_layer=1, d_model=10000000, d_ff=0 make 1.2e+15 parameters; at most 2**50"),
    (["train.global_batch=10000000000"],
     "train.global_batch: must be <= 16,777,216 (2**24) sequences per step, got 10000000000"),
    (["train.steps=1000000000000", "train.global_batch=16000000"],
     "train.steps: train.steps * train.global_batch = 1000000000000 * 16000000 blocks must "
     "be < 2**63"),
    (["train.eval_batches=1000000000000", "train.global_batch=16000000"],
     "train.eval_batches: eval_batches * global_batch"),
])
def test_absurd_sizes_are_config_errors(overrides, error):
    """Sizes no cluster, model or int64 index can hold are refused in one line, before
    anything is planned or started."""
    with pytest.raises(ConfigError) as e:
        load_spec(None, overrides)
    assert str(e.value).startswith(error) and "\n" not in str(e.value)


def test_the_largest_allowed_sizes_are_valid():
    spec = load_spec(None, ["parallel.dp=500000", "model.n_layer=100000",
                            "train.global_batch=16000000", "train.micro_batch=16",
                            "train.eval_batches=1"])
    assert spec.world_size == 1_000_000 and spec.grad_accum == 2
    from raypar.model import param_count
    from raypar.validation import model_param_count
    assert model_param_count(spec) == param_count(model_config(spec, spec.data.vocab_size))


def test_a_global_batch_of_many_passes_over_the_corpus_is_refused():
    from raypar.validation import check_corpus_fits
    spec = load_spec(None, ["train.global_batch=64000"])
    check_corpus_fits(spec, 64)  # a small corpus read many times a step is a valid run
    check_corpus_fits(load_spec(None, ["train.global_batch=16"]), 5)
    with pytest.raises(ConfigError) as e:
        check_corpus_fits(spec, 63)
    assert str(e.value).startswith("train.global_batch: 64000 sequences per step, but the "
                                   "corpus packs into 63 training blocks of data.seq_len + 1 "
                                   "= 129 tokens; at most 63000 (1000 passes over it)")
    with pytest.raises(ConfigError, match=r"^train.eval_batches: eval_batches \* global_batch"):
        load_spec(None, ["train.eval_batches=1000000000"])
