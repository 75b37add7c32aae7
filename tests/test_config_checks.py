"""The run's configs: each is read from the flags of its fields' names, and each checks itself, so a
config built by a test or a benchmark is refused as the command line refuses it."""
import dataclasses
import math

import pytest

from dlrm.cli import option_names
from dlrm.common import FlagError
from dlrm.data.config import RandomDataConfig
from dlrm.data.criteo.loaders import CriteoLoaderConfig
from dlrm.data.criteo.config import PreprocessConfig
from dlrm.model.dlrm import ModelConfig
from dlrm.outputs.side_channels import OutputConfig
from dlrm.run import flags
from dlrm.run.config import InferenceConfig, RunConfig, SystemConfig
from dlrm.run.train import TrainConfig

# Each config's fields that are not a flag's value: derived from flags, or not on the command line.
NOT_FLAGS = {
    ModelConfig: set(), TrainConfig: {"debug_groups"}, SystemConfig: set(), InferenceConfig: set(),
    OutputConfig: set(), RandomDataConfig: {"dense_dim"}, CriteoLoaderConfig: {"preprocess"},
    PreprocessConfig: {"progress", "data_split"},
}


@pytest.mark.parametrize("cls", list(NOT_FLAGS), ids=lambda cls: cls.__name__)
def test_every_field_is_read_from_the_flag_of_its_name(cls):
    dests = set(option_names(flags.build_parser()))
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - NOT_FLAGS[cls] <= dests, sorted(fields - NOT_FLAGS[cls] - dests)


def test_the_configs_hold_the_flags_values():
    cfg = flags.config_from_args(flags.build_parser().parse_args(
        ["--rand-data-dist=gaussian", "--rand-data-max=1.5", "--num-indices-per-lookup-fixed=true",
         "--data-trace-enable-padding=true", "--mlperf-logging", "--nepochs=3", "--arch-mlp-top=5-1"]))
    assert (cfg.data.distribution, cfg.data.rand_max, cfg.data.fixed, cfg.data.trace_padding) == ("gaussian", 1.5,
                                                                                                   True, True)
    assert cfg.output.mlperf_logging and cfg.train.mlperf_logging and cfg.train.nepochs == 3
    assert cfg.model.top_mlp == (8, 5, 1)  # 3 tables and the dense output: 4 * 3 / 2 pairs + 2 = 8
    assert cfg.data.dense_dim == 4 and cfg.data.test_batch_size == 1  # -1: the training size


MODEL = dict(embedding_dim=2, table_sizes=(4, 3), bottom_mlp=(4, 2), top_mlp=(5, 1))
DATA = dict(dense_dim=4, table_sizes=(4, 3), batch_size=2)


@pytest.mark.parametrize("make, message", [
    (lambda: RandomDataConfig(**{**DATA, "batch_size": 0}), "batch_size must be at least 1, got 0"),
    (lambda: RandomDataConfig(**DATA, test_num_workers=-2), "nor test_num_workers below -1"),
    (lambda: RandomDataConfig(**DATA, rand_sigma=math.nan), "rand_sigma must be a finite number, got nan"),
    (lambda: RandomDataConfig(**{**DATA, "table_sizes": (4, 0)}), "table_sizes: table 1 has 0 rows"),
    (lambda: RandomDataConfig(**DATA, distribution="poisson"), "distribution=poisson is not supported"),
    (lambda: RandomDataConfig(**DATA, distribution="gaussian", rand_max=9), "rand_max=9 lets gaussian indices reach 9"),
    (lambda: ModelConfig(**{**MODEL, "bottom_mlp": (4, 3)}), "embedding_dim=2 does not match the bottom MLP's output"),
    (lambda: ModelConfig(**{**MODEL, "top_mlp": (5, 2)}), "top_mlp must end in 1 (one prediction per sample), got 2"),
    (lambda: ModelConfig(**MODEL, qr_flag=True, md_flag=True), "qr_flag and md_flag cannot be combined"),
    (lambda: ModelConfig(**MODEL, md_temperature=-1.0), "md_temperature must not be negative, got -1"),
    (lambda: TrainConfig(nepochs=0), "nepochs must be at least 1, got 0"),
    (lambda: TrainConfig(learning_rate=math.inf), "learning_rate must be a finite number, got inf"),
    (lambda: TrainConfig(loss_function="wbce", loss_weights=(1.0,)), "loss_weights needs two values"),
    (lambda: TrainConfig(lr_num_warmup_steps=5, lr_decay_start_step=2, lr_num_decay_steps=3),
     "(lr_decay_start_step < lr_num_warmup_steps)"),
    (lambda: SystemConfig(seed=2**32), "seed must be in [0, 2**32)"),
    (lambda: SystemConfig(dist_init_timeout=0.0), "dist_init_timeout must be positive, got 0"),
    (lambda: InferenceConfig(quantize_emb_bits=16), "quantize_emb_bits must be 4, 8 or 32, got 16"),
])
def test_a_config_built_in_code_checks_itself_naming_its_fields(make, message):
    with pytest.raises(FlagError) as caught:
        make()
    assert message in str(caught.value)


def _run_config(**parts):
    base = dict(model=ModelConfig(**MODEL), data=RandomDataConfig(**DATA), train=TrainConfig(), system=SystemConfig(),
                output=OutputConfig(), inference=InferenceConfig())
    return RunConfig(**{**base, **parts})


@pytest.mark.parametrize("parts, message", [
    (dict(train=TrainConfig(fast_numerics=True), system=SystemConfig(use_gpu=True)), "fast_numerics is for CPUs"),
    (dict(inference=InferenceConfig(quantize_emb_bits=8), model=ModelConfig(**MODEL, md_flag=True)),
     "quantize_emb_bits works on CPU with plain tables only"),
    (dict(train=TrainConfig(mlperf_logging=True, test_freq=2)), "mlperf_logging computes classification metrics"),
])
def test_combinations_of_parts_are_checked_by_the_run_config(parts, message):
    with pytest.raises(FlagError, match=message):
        _run_config(**parts)
    _run_config()  # each part alone is fine


def test_a_field_is_named_by_its_option_on_the_command_line():
    with pytest.raises(FlagError) as caught:
        TrainConfig(print_freq=0)
    assert caught.value.message(option_names(flags.build_parser())) == "--print-freq must be at least 1, got 0"
