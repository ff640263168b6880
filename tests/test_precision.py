"""pipeline.precision: what `auto` picks for every capability combination, explicit values
obeyed, the emulated-bf16 warning, the config value, and the trainer running what it resolved."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from pipeline import precision as prec
from pipeline.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from pipeline.precision import Capabilities, capabilities, resolve
from pipeline.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

AVX2 = frozenset({"avx", "avx2", "fma3"})  # AMD EPYC Rome/Milan, Haswell..Skylake-client
AVX512 = AVX2 | {"avx512_f", "avx512_bw", "avx512_vl"}  # Skylake/Cascade Lake Xeon

# (capabilities, native bf16?) for every kind of machine the rule distinguishes.
MACHINES = {
    "cpu-avx2": (Capabilities("cpu", AVX2, "AVX2"), False),
    "cpu-avx512-no-bf16": (Capabilities("cpu", AVX512, "AVX512"), False),
    "cpu-avx512_bf16": (Capabilities("cpu", AVX512 | {"avx512_bf16"}, "AVX512"), True),
    "cpu-amx": (Capabilities("cpu", AVX512 | {"amx_bf16", "amx_tile"}, "AVX512"), True),
    "cpu-arm-bf16": (Capabilities("cpu", frozenset({"neon", "bf16"}), "DEFAULT"), True),
    "cpu-arm-no-bf16": (Capabilities("cpu", frozenset({"neon"}), "DEFAULT"), False),
    "cpu-nothing": (Capabilities("cpu"), False),
    "cuda-ampere": (Capabilities("cuda", AVX2, "AVX2", cuda_bf16=True), True),
    "cuda-turing": (Capabilities("cuda", AVX512 | {"avx512_bf16"}, "AVX512"), False),
    "mps": (Capabilities("mps", frozenset({"neon", "bf16"})), False),
}


@pytest.mark.parametrize("name", list(MACHINES))
def test_auto_is_bf16_exactly_where_it_is_native(name):
    caps, native = MACHINES[name]
    assert caps.native_bf16() is native
    r = resolve("auto", "auto", caps)
    assert r.precision == ("bf16" if native else "fp32")
    # channels_last follows: on with bf16 (oneDNN's bf16 convs want NHWC) and on any GPU.
    assert r.channels_last is (native or caps.device_type == "cuda")
    assert ("no native" in r.reason) is not native


@pytest.mark.parametrize("name", list(MACHINES))
@pytest.mark.parametrize("explicit", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_explicit_values_mean_exactly_that_everywhere(name, explicit, channels_last):
    r = resolve(explicit, channels_last, MACHINES[name][0])
    assert (r.precision, r.channels_last) == (explicit, channels_last)
    # auto channels_last with an explicit dtype follows the dtype, not the hardware's bf16.
    cl = resolve(explicit, "auto", MACHINES[name][0]).channels_last
    assert cl is (explicit == "bf16" or MACHINES[name][0].device_type == "cuda")


def test_bad_values_raise_naming_the_key():
    caps = MACHINES["cpu-avx2"][0]
    with pytest.raises(ValueError, match="train.precision: 'fp16'"):
        resolve("fp16", "auto", caps)
    with pytest.raises(ValueError, match="train.channels_last: 'yes'"):
        resolve("auto", "yes", caps)


def test_describe_names_the_instruction_sets_and_torch_level():
    assert MACHINES["cpu-avx2"][0].describe() == "avx2, torch AVX2"
    amx = MACHINES["cpu-amx"][0].describe()
    assert amx == "avx2 avx512_f amx_bf16 amx_tile, torch AVX512"
    assert resolve("auto", "auto", MACHINES["cpu-amx"][0]).as_tags() == {
        "resolved.precision": "bf16",
        "resolved.channels_last": "true",
    }


def test_emulated_bf16_warns_once_naming_the_isa_and_auto_never(monkeypatch):
    prec._warn_emulated.cache_clear()
    monkeypatch.setattr(prec, "capabilities", lambda device: MACHINES["cpu-avx2"][0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prec.resolve_for("auto", "auto", "cpu").precision == "fp32"
        assert prec.resolve_for("fp32", "auto", "cpu").precision == "fp32"
        assert not caught
        for _ in range(3):
            assert prec.resolve_for("bf16", "auto", "cpu").precision == "bf16"
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "avx2, torch AVX2" in str(caught[0].message) and "emulated" in str(caught[0].message)
    prec._warn_emulated.cache_clear()


def test_real_machine_capabilities_match_proc_cpuinfo():
    caps = capabilities("cpu")
    assert caps.device_type == "cpu"
    assert caps.cpu_capability == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "flags" not in cpuinfo.read_text():
        pytest.skip("no x86 /proc/cpuinfo flags to compare with")
    flags = set(
        next(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")).split()
    )
    assert ("avx2" in caps.cpu_isa) == ("avx2" in flags)
    assert caps.native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_config_accepts_auto_by_default_and_rejects_other_values():
    cfg = load_config(None)
    assert (cfg.train.precision, cfg.train.channels_last) == ("auto", "auto")
    cfg = load_config(None, ["train.precision=bf16", "train.channels_last=false"])
    assert (cfg.train.precision, cfg.train.channels_last) == ("bf16", False)
    with pytest.raises(ConfigError, match="train.precision: 'fp16'"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.channels_last: 'sometimes'"):
        load_config(None, ["train.channels_last=sometimes"])


def test_shipped_configs_leave_precision_to_auto():
    paths = [p for p in sorted((REPO / "jobs" / "configs").glob("*.yaml")) if "tune_" not in p.name]
    assert paths
    for path in paths:
        train = load_config(path).train
        assert (train.precision, train.channels_last) == ("auto", "auto"), path


def tiny(**train) -> Config:
    return Config(
        data=DataConfig(image_size=32, batch_size=2),
        model=ModelConfig(image_size=32, width=4, bottleneck=8),
        train=TrainConfig(**train),
    )


@pytest.mark.parametrize(
    "train",
    [
        {"precision": "fp32", "channels_last": False},
        {"precision": "fp32", "channels_last": True},
        {},
    ],
)
def test_trainer_records_and_runs_what_it_resolved(one_thread, train):
    t = Trainer(tiny(**train))
    auto = resolve("auto", "auto", capabilities("cpu"))  # {}: whatever this machine resolves to
    expected = (
        train.get("precision", auto.precision),
        train.get("channels_last", auto.channels_last),
    )
    assert (t.resolved.precision, t.resolved.channels_last) == expected
    # The networks are laid out as resolved, and autocast computes in the resolved dtype.
    convs = [p for p in t.g.parameters() if p.dim() == 4]
    fmt = torch.channels_last if expected[1] else torch.contiguous_format
    assert convs and all(w.is_contiguous(memory_format=fmt) for w in convs)
    with t._autocast():
        y = t.g(torch.randn(2, 3, 32, 32))
    assert y.dtype == (torch.bfloat16 if expected[0] == "bf16" else torch.float32)
